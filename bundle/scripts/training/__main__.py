"""``python -m scripts.training``: every model fold of the cross-validation, then the operating points."""

from scripts.training.folds import main

if __name__ == "__main__":
    main()
