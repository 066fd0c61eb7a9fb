"""Command-line plumbing shared by the bundle's workflows and commands: one-line errors, ``--help`` of a bundle
workflow, SIGTERM as a clean exit."""

from __future__ import annotations

import os
import re


def describe_error(err: BaseException) -> str:
    """One line for a failure: the innermost cause (MONAI nests the real error inside "applying transform"
    wrappers) with its type, and the transform that raised it when there is one."""
    stage, inner = None, err
    # MONAI's wrappers: a transform's ("applying transform <...>") and a config expression's ("Failed to evaluate")
    while inner.__cause__ is not None and re.search(r"applying transform|Failed to evaluate", str(inner)):
        match = re.search(r"applying transform <([\w.]+)", str(inner))
        stage = match.group(1).rsplit(".", 1)[-1] if match else stage
        inner = inner.__cause__
    text = str(inner).strip().splitlines()[0] if str(inner).strip() else ""
    reason = f"{type(inner).__name__}: {text}" if text else type(inner).__name__
    if isinstance(inner, ValueError) and text:  # the bundle's own checks: their message says it all
        reason = text
    return f"{stage}: {reason}" if stage else reason


def one_line_errors(debug_variable: str = "MOOD_DEBUG") -> None:
    """An error that ends a command-line run prints one line, its real cause (:func:`describe_error`), instead of
    a traceback of MONAI's config machinery; ``MOOD_DEBUG=1`` keeps the traceback. Only uncaught errors are
    affected, so callers that handle errors themselves see no difference."""
    import sys

    if os.environ.get(debug_variable) == "1":
        return

    def hook(kind, value, traceback):
        if issubclass(kind, KeyboardInterrupt):
            return sys.__excepthook__(kind, value, traceback)
        print(f"error: {describe_error(value)}  ({debug_variable}=1 shows the traceback)", file=sys.stderr)

    sys.excepthook = hook


def show_usage(requested: bool, usage: str) -> None:
    """``--help`` of a bundle workflow: MONAI's command line passes it on as the config key ``help``; print the
    config's ``usage`` and exit 0 before any work."""
    import sys

    if requested:
        print(usage.rstrip())
        sys.exit(0)


def start(requested_help: bool, usage: str, exit_on_sigterm: bool = False) -> None:
    """The first step of every workflow's ``initialize``: one-line errors (:func:`one_line_errors`), ``--help``
    (:func:`show_usage`) and, for runs that write results a stop must not leave half-written,
    :func:`exit_cleanly_on_sigterm`."""
    one_line_errors()
    show_usage(requested_help, usage)
    if exit_on_sigterm:
        exit_cleanly_on_sigterm()


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM (a scheduler's stop, MOOD's time limit) into SystemExit, so the writers remove their
    half-written temporary file instead of leaving it behind."""
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
