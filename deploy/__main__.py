"""Entry point of the packaged application (MAP): `python <app folder>` runs the app."""

import sys

from app import main

if __name__ == "__main__":
    sys.exit(main())
