"""Operating points of a trained ensemble: the sample-score and voxel thresholds at stated false-positive rates on
normal scans, recorded in the models' plan (``plans.json``, key ``operating_points``) and used by inference to flag
scans and to measure the volume above the voxel threshold (the worklist, ``scripts.inference.worklist``).

A threshold at rate ``r`` is the smallest of the normal scores above which at most a fraction ``r`` of the normal
scans (or of the normal scans' foreground voxels) lie: scores strictly above it are flagged. The rates are only as
fine as the normal scans are many (with 40 normals, 1 % is the largest normal score).

Where the normals come from:

- after training (``python -m scripts.training``, what ``make train`` runs), from the run's synthetic validation:
  every training scan as it is (the normals), and the fixed validation samples of each model fold with synthetic
  anomalies of its held-out tasks (the sensitivity at each threshold), all scored by the whole fold ensemble exactly
  as inference scores a scan. Each normal scan was in the training data of most folds, so on new normal scans the
  false-positive rates are likely higher than stated; the anomalies are synthetic, so the sensitivities say how
  well the ensemble finds anomalies like the held-out tasks, not real lesions;
- on a team's own normal scans (``python -m scripts.calibration --models_dir M --dataset brain --normals_dir DIR``):
  thresholds only, no sensitivities; the rates then hold for scans like those. With ``--check`` it changes nothing
  and prints the fraction of those scans above each recorded threshold, to compare with its stated rate;
- for models trained earlier, from their training scans as after training (``--training_dir DIR [--foreign_dir
  DIR]``; how the shipped models' operating points were made, ``models/README.md``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from scripts.cli import describe_error
from scripts.inference.ensemble import load_ensemble
from scripts.inference.operating_points import _score_normals, calibrate, record_operating_points
from scripts.inference.predictor import Predictor, bundle_config
from scripts.io.files import BUNDLE_ROOT, bundle_configs


def _evenly(items: Sequence, count: int | None) -> list:
    """At most ``count`` of ``items``, evenly spaced (all of them for None)."""
    if count is None or count >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def calibrate_training_run(config_files: Sequence[str], overrides: Mapping, bundle_root: str,
                           max_normals: int | None = 200, max_anomalous: int | None = 100) -> Path:
    """Record the operating points of a finished training run (:func:`scripts.training.folds.train_folds` calls it after
    every fold has trained): its training scans as normals (at most ``max_normals``) and the fixed validation
    samples of every model fold that hold a synthetic anomaly of its held-out tasks (at most ``max_anomalous``),
    scored by the run's fold ensemble."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_meta(str(Path(bundle_root) / "configs" / "metadata.json"))
    parser.read_config(list(config_files))
    # the models' own plan instead of the plan step's: every setup value of the config reads it
    parser.update({"bundle_root": bundle_root, **overrides,
                   "plan": "$scripts.plans.load_plan(@models_dir, @dataset_name)"})
    get = parser.get_parsed_content
    dataset, models_dir, plan = get("dataset_name"), Path(get("models_dir")), get("plan")
    # the run's config may bound the scans scored (a voxel classifier scores a scan in seconds, not a fraction)
    max_normals = get("calibration_max_normals", default=max_normals)
    max_anomalous = get("calibration_max_anomalous", default=max_anomalous)
    device = get("device")
    predictor = Predictor(load_ensemble(get("network_def"), models_dir, dataset, device, plan=plan), get("inferer"),
                          device, get("amp"))
    normalise = get("normalise")
    scans = get("preprocessed_scans")
    normals = (normalise(dict(scans[i])) for i in _evenly(range(len(scans)), max_normals))
    samples = []
    for fold in range(len(plan["split"]["model_folds"])):
        parser["fold"] = fold  # resets the parsed content: the fold's split and validation samples
        validation = parser.get_parsed_content("validate#dataset")
        samples += [((i + 0.5) / len(validation), fold, validation, i) for i in range(len(validation))]
    # which samples hold an anomaly is known only once they are made: take them interleaved over the folds (every
    # fold's held-out tasks) until there are enough
    samples.sort(key=lambda s: s[:2])
    anomalous = itertools.islice((item for item in (s[2][s[3]] for s in samples)
                                  if float(torch.as_tensor(item["label"]).max()) > 0), max_anomalous)
    record = calibrate(predictor, normals, anomalous, plan["sample_score"])
    return record_operating_points(models_dir, dataset, record,
                                   "synthetic validation of training: the training scans as normals, the validation "
                                   "samples of each fold's held-out tasks as anomalies, scored by the fold ensemble")


def _normals_of_folder(parser, normals_dir: str | os.PathLike, max_normals: int | None) -> tuple[list, Iterable]:
    """The scans of ``normals_dir`` (at most ``max_normals``, evenly spaced), found and preprocessed as inference
    does (the config's ``inputs``: volumes, or 2D images with xray.yaml)."""
    parser["dataset_dir"] = str(normals_dir)
    preprocessing, normalise = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("normalise")
    try:
        found = parser.get_parsed_content("inputs")
    except RuntimeError as err:  # MONAI's "Failed to evaluate" around the finder's own clear error
        raise (err.__cause__ or err) from None
    inputs = _evenly(found, max_normals)
    return inputs, (normalise(preprocessing({"image": item["image"]})) for item in inputs)


def calibrate_on_normals(models_dir: str | os.PathLike, dataset: str, normals_dir: str | os.PathLike,
                         bundle_root: str | os.PathLike | None = None, max_normals: int | None = None) -> Path:
    """Record thresholds measured on a folder of normal scans (a team's own), preprocessed as inference does."""
    parser = bundle_config(dataset, models_dir, bundle_root)
    get = parser.get_parsed_content
    inputs, normals = _normals_of_folder(parser, normals_dir, max_normals)
    record = calibrate(Predictor.for_maps(parser), normals, [], get("sample_score_method"))
    return record_operating_points(models_dir, dataset, record,
                                   f"normal scans of {Path(normals_dir).name!r} ({len(inputs)} scans), scored by the "
                                   "fold ensemble; no sensitivities (no anomalies)")


def check_on_normals(models_dir: str | os.PathLike, dataset: str, normals_dir: str | os.PathLike,
                     bundle_root: str | os.PathLike | None = None, max_normals: int | None = None) -> dict:
    """How the recorded operating points fare on a folder of normal scans, without changing them: for each recorded
    rate, the fraction of these scans above its sample threshold (and of their foreground voxels above its voxel
    threshold), to compare with the rate the threshold was set for."""
    parser = bundle_config(dataset, models_dir, bundle_root)
    get = parser.get_parsed_content
    recorded = get("plan").get("operating_points")
    if not recorded:
        raise ValueError(f"the {dataset} models in {str(models_dir)!r} record no operating points to check")
    inputs, normals = _normals_of_folder(parser, normals_dir, max_normals)
    scores, tail = _score_normals(Predictor.for_maps(parser), normals, get("sample_score_method"))
    values = np.asarray(scores)
    return {
        "normal_scans": len(scores),
        "sample": {rate: {"threshold": t, "fraction_above": float((values > t).mean())}
                   for rate, t in recorded["sample"]["thresholds"].items()},
        "voxel": {rate: {"threshold": t, "fraction_above": tail.fraction_above(t)}
                  for rate, t in recorded["voxel"]["thresholds"].items()},
    }


# what makes a run's validation samples besides its data: the recipe keys a fold records (fold_<k>.json, "recipe")
VALIDATION_SETTINGS = ("max_val_samples", "label_sigma", "max_anomalies", "seed")


def training_settings(folder: str | os.PathLike) -> dict:
    """The settings of the run that trained the models in ``folder`` that make its validation samples: the plan's
    split (training tasks per fold, or the fixed ones) and its first fold's recorded recipe; without them, every
    setting would be training's default, and the samples, their tasks and the sensitivities another run's."""
    folder = Path(folder)
    split = json.loads((folder / "plans.json").read_text()).get("split") or {}
    settings = {}
    if split.get("train_tasks"):
        settings["train_tasks"] = list(split["train_tasks"])
    elif split.get("num_train_tasks"):
        settings["num_train_tasks"] = int(split["num_train_tasks"])
    if split.get("tasks"):
        settings["tasks"] = list(split["tasks"])
    folds = sorted(folder.glob("fold_*.json"))
    recipe = (json.loads(folds[0].read_text()).get("recipe") or {}) if folds else {}
    settings.update({key: recipe[key] for key in VALIDATION_SETTINGS if key in recipe})
    return settings


def calibrate_from_training_data(models_dir: str | os.PathLike, dataset: str, training_dir: str | os.PathLike,
                                 foreign_dir: str | os.PathLike | None = None,
                                 cache_dir: str | os.PathLike | None = None,
                                 bundle_root: str | os.PathLike | None = None, max_normals: int | None = 200,
                                 max_anomalous: int | None = 100, overrides: Mapping | None = None) -> Path:
    """:func:`calibrate_training_run` for models trained earlier (e.g. the shipped ones): their training scans
    ``training_dir`` (and ``foreign_dir`` for ``poisson_inter``) with training's default settings, the settings
    that made the run's validation samples (:func:`training_settings`) and ``overrides``, the grid and
    normalisation from the plan. The decoded scans go to ``cache_dir``, by default a temporary folder removed
    afterwards."""
    import shutil
    import tempfile

    bundle_root = str(bundle_root or BUNDLE_ROOT)
    models_dir = Path(models_dir).resolve()
    if not (models_dir / dataset / "plans.json").is_file():
        raise FileNotFoundError(f"no plans.json in {str(models_dir / dataset)!r}")
    temporary = None if cache_dir else tempfile.mkdtemp(prefix="mood_calibration_cache_")
    try:
        settings = {"dataset_dir": str(training_dir), "output_dir": str(models_dir.parent),
                    "cache_dir": str(cache_dir or temporary), "num_workers": 0,
                    **training_settings(models_dir / dataset), **(overrides or {})}
        if foreign_dir:
            settings["foreign_dir"] = str(foreign_dir)
        elif "poisson_inter" in (settings.get("tasks") or ()):
            raise ValueError(f"the {dataset} models in {str(models_dir)!r} were trained with poisson_inter, which "
                             "takes its patches from another dataset's scans: pass --foreign_dir (the run's own)")
        return calibrate_training_run(bundle_configs(bundle_root, "train", dataset), settings, bundle_root,
                                      max_normals, max_anomalous)
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> Path | dict:
    parser = argparse.ArgumentParser(description="Record the operating points (thresholds at false-positive rates) "
                                                 "of trained models: on a folder of normal scans, or on the synthetic "
                                                 "validation of their training data; or, with --check, see how the "
                                                 "recorded ones fare on a folder of normal scans.")
    parser.add_argument("--models_dir", required=True, help="folder of dataset subfolders (e.g. runs/models)")
    parser.add_argument("--dataset", required=True, help="the dataset subfolder (brain, abdom)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--normals_dir", help="a folder of normal *.nii.gz / *.nii scans (thresholds only)")
    source.add_argument("--training_dir", help="the models' training scans: their synthetic validation, as "
                                               "training measures it (thresholds and sensitivities)")
    parser.add_argument("--foreign_dir", default=None, help="with --training_dir: the foreign scans of training")
    parser.add_argument("--cache_dir", default=None, help="with --training_dir: where decoded scans are cached "
                                                          "(default: a temporary folder, removed)")
    parser.add_argument("--max_normals", type=int, default=None, help="at most this many normals, evenly spaced")
    parser.add_argument("--max_anomalous", type=int, default=100, help="with --training_dir: anomalous samples")
    parser.add_argument("--check", action="store_true",
                        help="with --normals_dir, change nothing: print the fraction of these normals above each "
                             "recorded threshold")
    args = parser.parse_args(argv)
    if args.check and args.training_dir:
        parser.error("--check goes with --normals_dir (it changes nothing; --training_dir records)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.training_dir:
            path = calibrate_from_training_data(args.models_dir, args.dataset, args.training_dir, args.foreign_dir,
                                                args.cache_dir, max_normals=args.max_normals or 200,
                                                max_anomalous=args.max_anomalous)
        elif args.check:
            result = check_on_normals(args.models_dir, args.dataset, args.normals_dir, max_normals=args.max_normals)
            print(json.dumps(result, indent=1))
            return result
        else:
            path = calibrate_on_normals(args.models_dir, args.dataset, args.normals_dir, max_normals=args.max_normals)
    except (ValueError, FileNotFoundError, OSError) as err:
        raise SystemExit(f"calibration: {describe_error(err)}") from None
    print(path)
    return path


if __name__ == "__main__":
    main()
