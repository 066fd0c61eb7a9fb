"""Score a folder of scans with a models folder: the bundle's inference workflow as one plain command.

    python -m scripts.predict -i IN -o OUT -d brain|abdom|xray [-m MODELS] [--mode pixel|sample|both]

The same run as ``python -m monai.bundle run`` with the bundle's inference configs for the dataset (common.yaml,
inference.yaml, the dataset overlay), through the same :class:`scripts.inference.predictor.Predictor`; the four MOOD
run scripts are this command with one mode and dataset each. OUT receives MOOD's files: ``<name>`` (the anomaly map
on the input grid, pixel and both) and ``<name>.txt`` (the score, sample and both); ``--worklist`` adds
``scores.csv``. Exit codes: 0 every case scored, 3 some case failed (named in the log; the others were scored, a
failed case has the fallback score), other: could not start. ``MOOD_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import monai.bundle

from scripts.inference.engine import MODES
from scripts.io.files import BUNDLE_ROOT, DATASETS, MODEL_SUFFIXES, bundle_configs


def arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.predict", description=__doc__.splitlines()[0])
    parser.add_argument("-i", "--input", required=True, help="folder of scans (NIfTI, DICOM series; xray: images)")
    parser.add_argument("-o", "--output", required=True, help="folder for the outputs (made if missing)")
    parser.add_argument("-d", "--dataset", required=True, choices=DATASETS, help="which models and preprocessing")
    parser.add_argument("-m", "--models", default=None,
                        help="folder of <dataset>/ subfolders of fold models and their plans.json (default: the "
                             "bundle's models)")
    parser.add_argument("--mode", default="both", choices=MODES,
                        help="pixel: the maps; sample: the scores; both: both from one pass (default)")
    parser.add_argument("--worklist", nargs="?", const=True, default="",
                        help="also write the worklist (default OUT/scores.csv; a path: there)")
    parser.add_argument("--model_format", default="pytorch", choices=sorted(MODEL_SUFFIXES),
                        help="the state dicts (default) or their exports made by `make export`")
    parser.add_argument("--allow_partial_ensemble", action="store_true",
                        help="score with the folds there are when some of the plan's folds are missing")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace) -> dict:
    """The inference workflow's keys for these arguments."""
    output = str(Path(args.output).absolute())
    worklist = str(Path(output, "scores.csv")) if args.worklist is True else args.worklist
    found = {"dataset_dir": str(Path(args.input).absolute()), "output_dir": output, "mode": args.mode,
             "worklist": worklist, "model_format": args.model_format,
             "allow_partial_ensemble": bool(args.allow_partial_ensemble)}
    if args.models:
        found["models_dir"] = str(Path(args.models).absolute())
    return found


def main(argv: Sequence[str] | None = None) -> None:
    args = arguments(argv)
    root = str(BUNDLE_ROOT)
    monai.bundle.run(run_id="run", meta_file=os.path.join(root, "configs", "metadata.json"),
                     config_file=bundle_configs(root, "inference", args.dataset),
                     logging_file=os.path.join(root, "configs", "logging.conf"), bundle_root=root, **settings(args))


if __name__ == "__main__":
    main()
