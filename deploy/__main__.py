"""Entry point of the packaged application (MAP): `python <app folder>` runs the app."""

from app import MoodAnomalyApp

if __name__ == "__main__":
    MoodAnomalyApp().run()
