"""Operating points of a trained ensemble: the sample-score and voxel thresholds at stated false-positive rates on
normal scans, recorded in the models' plan (``plans.json``, key ``operating_points``) and used by inference to flag
scans and to measure the volume above the voxel threshold (the worklist, ``scripts.worklist``).

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
import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import date
from pathlib import Path

import numpy as np
import torch

from scripts.files import MODEL_SUFFIXES, bundle_configs, load_json, save_json

__all__ = ["DEFAULT_FPRS", "DEFAULT_VOXEL_FPRS", "VoxelTail", "calibrate", "calibrate_from_training_data",
           "calibrate_on_normals", "calibrate_training_run", "check_on_normals", "fold_digests", "operating_point",
           "record_operating_points", "score_threshold"]

logger = logging.getLogger(__name__)

# the false-positive rates on normal scans at which thresholds are recorded (inference may ask for any other sample
# rate: the normal scores are recorded too), and on the normal scans' foreground voxels
DEFAULT_FPRS = (0.1, 0.05, 0.01)
DEFAULT_VOXEL_FPRS = (1e-2, 1e-3, 1e-4)
# maps are probabilities in [0, 1]; voxel thresholds are read from a histogram of this many equal bins (a step of
# 1.5e-5, finer than the float16 the maps are stored in near 1)
VOXEL_BINS = 2**16


def score_threshold(normal_scores: Sequence[float], fpr: float) -> float:
    """The smallest normal score ``t`` such that at most a fraction ``fpr`` of ``normal_scores`` lie strictly above
    it: flagging scores ``> t`` flags at most ``fpr`` of these normal scans."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"a false-positive rate must be in (0, 1), got {fpr}")
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("no normal scores to set a threshold from")
    # with n scores, index ceil(n (1 - fpr)) - 1 leaves n - ceil(n (1 - fpr)) <= n fpr scores above
    index = max(0, math.ceil(round(scores.size * (1.0 - fpr), 9)) - 1)
    return float(scores[index])


class VoxelTail:
    """A histogram of map values in [0, 1] (:data:`VOXEL_BINS` bins), added to scan by scan: the voxel thresholds
    at given rates without keeping every voxel."""

    def __init__(self, bins: int = VOXEL_BINS) -> None:
        self.counts = np.zeros(bins, dtype=np.int64)

    def add(self, values: torch.Tensor) -> None:
        values = values.detach().float().reshape(-1).clamp(0.0, 1.0)
        self.counts += torch.histc(values, bins=self.counts.size, min=0.0, max=1.0).cpu().numpy().astype(np.int64)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def fraction_above(self, threshold: float) -> float:
        """The fraction of the voxels in the bins that start at or above ``threshold`` (to a bin's resolution; exact
        for the thresholds :meth:`threshold` gives, which are bin edges)."""
        start = min(math.ceil(threshold * self.counts.size - 1e-6), self.counts.size)
        return float(self.counts[start:].sum() / max(1, self.total))

    def threshold(self, fpr: float) -> float:
        """The upper edge of the lowest bin above which at most a fraction ``fpr`` of the voxels lie."""
        if self.total == 0:
            raise ValueError("no voxels to set a threshold from")
        above = self.total - np.cumsum(self.counts)  # voxels in the bins after each bin
        first = int(np.argmax(above <= fpr * self.total))
        return (first + 1) / self.counts.size


def _progress(what: str, index: int) -> None:
    if index == 1 or index % 10 == 0:  # a line now and then: a calibration takes minutes on a CPU
        logger.info("calibration: scoring %s %d", what, index)


def _map(network, inferer, image: torch.Tensor, device, amp: bool) -> torch.Tensor:
    """The ensemble's map of one preprocessed, normalised scan (channel first) on its working grid, (D, H, W)."""
    batch = torch.as_tensor(image)[None].to(device)
    autocast = torch.autocast("cuda") if amp and torch.device(device).type == "cuda" else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        return inferer(batch, network)[0, 0].float()


def _score_normals(network, inferer, normals: Iterable[Mapping], method: float | Mapping, device,
                   amp: bool) -> tuple[list[float], VoxelTail]:
    """The sorted sample scores of ``normals`` (rounded as recorded) and the histogram of their foreground voxels."""
    from scripts.postprocessing import sample_score

    network.eval()
    scores, tail = [], VoxelTail()
    for index, item in enumerate(normals, 1):
        _progress("normal scan", index)
        probabilities = _map(network, inferer, item["image"], device, amp)
        scores.append(float(sample_score(probabilities, method)))
        foreground = torch.as_tensor(item["foreground"])[0].to(probabilities.device) > 0
        tail.add(probabilities[foreground] if foreground.any() else probabilities)
    if not scores:
        raise ValueError("no normal scans to calibrate on")
    return sorted(round(s, 6) for s in scores), tail  # as recorded: inference sets thresholds from these


def calibrate(network, inferer, normals: Iterable[Mapping], anomalous: Iterable[Mapping], method: float | Mapping,
              device="cpu", amp: bool = False, fprs: Sequence[float] = DEFAULT_FPRS,
              voxel_fprs: Sequence[float] = DEFAULT_VOXEL_FPRS) -> dict:
    """The operating points of ``network`` (the fold ensemble, which returns probabilities) from ``normals``
    (preprocessed, normalised scans: ``image`` and ``foreground``) and ``anomalous`` (samples with ``image`` and
    their synthetic ``label``; may be empty): the normal scores and the sample thresholds at ``fprs``, the voxel
    thresholds at ``voxel_fprs`` over the normals' foreground voxels, and, with anomalous samples, the fraction of
    them (and of their anomalous voxels, label >= 0.5) above each threshold."""
    from scripts.postprocessing import sample_score

    normal_scores, tail = _score_normals(network, inferer, normals, method, device, amp)
    sample_thresholds = {str(r): score_threshold(normal_scores, r) for r in fprs}
    voxel_thresholds = {str(r): tail.threshold(r) for r in voxel_fprs}
    anomalous_scores, anomalous_voxels = [], {key: 0 for key in voxel_thresholds}
    voxels_in_anomalies = 0
    for index, item in enumerate(anomalous, 1):
        _progress("anomalous sample", index)
        probabilities = _map(network, inferer, item["image"], device, amp)
        anomalous_scores.append(float(sample_score(probabilities, method)))
        inside = probabilities[torch.as_tensor(item["label"])[0].to(probabilities.device) >= 0.5]
        voxels_in_anomalies += inside.numel()
        for key, threshold in voxel_thresholds.items():
            anomalous_voxels[key] += int((inside > threshold).sum())
    scores = np.asarray(anomalous_scores)
    found = bool(anomalous_scores)
    return {
        "normal_scans": len(normal_scores),
        "anomalous_samples": len(anomalous_scores),
        "sample": {
            "normal_scores": normal_scores,
            "thresholds": sample_thresholds,
            "sensitivity": {k: float((scores > t).mean()) for k, t in sample_thresholds.items()} if found else None,
        },
        "voxel": {
            "normal_voxels": tail.total,
            "thresholds": voxel_thresholds,
            "sensitivity": ({k: n / voxels_in_anomalies for k, n in anomalous_voxels.items()}
                            if voxels_in_anomalies else None),
        },
    }


def fold_digests(models_dir: str | os.PathLike, dataset: str) -> dict[str, str]:
    """SHA-256 of each fold's state dict: an operating point holds only for the weights it was measured with."""
    folder = Path(models_dir) / dataset
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob(f"fold_*{MODEL_SUFFIXES['pytorch']}"))}


def record_operating_points(models_dir: str | os.PathLike, dataset: str, record: Mapping, source: str) -> Path:
    """Add ``record`` (:func:`calibrate`'s) to the plan of ``models_dir/<dataset>`` as ``operating_points``, with
    where its normals came from and the digests of the folds it was measured with; the plan is replaced whole."""
    path = Path(models_dir) / dataset / "plans.json"
    plan = load_json(path)
    plan["operating_points"] = {"source": source, "date": date.today().isoformat(),
                                "folds": fold_digests(models_dir, dataset), **record}
    save_json(plan, path)
    sample, voxel = record["sample"], record["voxel"]
    logger.info("operating points of the %s models (%d normal scans, %d anomalous samples): sample thresholds %s "
                "(sensitivity %s), voxel thresholds %s, in %s", dataset, record["normal_scans"],
                record["anomalous_samples"], _rounded(sample["thresholds"]), _rounded(sample["sensitivity"]),
                _rounded(voxel["thresholds"]), path)
    return path


def _rounded(values: Mapping | None) -> dict | None:
    return None if values is None else {k: round(v, 4) for k, v in values.items()}


def operating_point(plan: Mapping, models_dir: str | os.PathLike, dataset: str, flag_fpr: float,
                    voxel_fpr: float, test_time_flips: Sequence[int] = (), sliding_window: bool | None = None,
                    sample_score_method: Mapping | None = None) -> dict:
    """The thresholds inference uses: ``sample_threshold`` at ``flag_fpr`` (any rate, from the recorded normal
    scores) and ``voxel_threshold`` at ``voxel_fpr`` (one of the recorded rates). Both are None, with a warning, when
    they would not describe this run's maps: the plan has no operating points; the fold weights there now are not
    exactly the ones they were measured with (a fold retrained, missing or added); or the run changes the maps with
    ``test_time_flips`` or a ``sliding_window`` other than the plan's, which the measurement did not use, or scores
    the maps with a ``sample_score_method`` other than the plan's."""
    point = {"flag_fpr": float(flag_fpr), "voxel_fpr": float(voxel_fpr), "sample_threshold": None,
             "voxel_threshold": None}
    recorded = plan.get("operating_points")
    hint = (f"calibrate with 'PYTHONPATH=bundle python -m scripts.calibration --models_dir {models_dir} --dataset "
            f"{dataset} --normals_dir <normal scans>'")
    if not recorded:
        logger.warning("the %s models' plan records no operating points: scans are not flagged (%s)", dataset, hint)
        return point
    if fold_digests(models_dir, dataset) != recorded.get("folds"):
        logger.warning("the %s operating points were measured with other fold weights than those in %s (a fold "
                       "retrained, missing or added): scans are not flagged (%s)", dataset, Path(models_dir) / dataset,
                       hint)
        return point
    changed = [what for what, differs in (("test_time_flips", bool(test_time_flips)),
                                          ("sliding_window", sliding_window is not None
                                           and bool(sliding_window) != bool(plan.get("sliding_window"))),
                                          ("the sample score aggregation", sample_score_method is not None
                                           and dict(sample_score_method) != dict(plan["sample_score"])))
               if differs]
    if changed:
        logger.warning("%s: not what the %s operating points were measured with; scans are not flagged",
                       " and ".join(changed), dataset)
        return point
    point["sample_threshold"] = score_threshold(recorded["sample"]["normal_scores"], float(flag_fpr))
    voxel = {float(k): v for k, v in recorded["voxel"]["thresholds"].items()}
    if float(voxel_fpr) not in voxel:
        raise ValueError(f"voxel_fpr {voxel_fpr} is not one of the recorded rates {sorted(voxel)}")
    point["voxel_threshold"] = float(voxel[float(voxel_fpr)])
    return point


def _evenly(items: Sequence, count: int | None) -> list:
    """At most ``count`` of ``items``, evenly spaced (all of them for None)."""
    if count is None or count >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def calibrate_training_run(config_files: Sequence[str], overrides: Mapping, bundle_root: str,
                           max_normals: int | None = 200, max_anomalous: int | None = 100) -> Path:
    """Record the operating points of a finished training run (:func:`scripts.training.train_folds` calls it after
    every fold has trained): its training scans as normals (at most ``max_normals``) and the fixed validation
    samples of every model fold that hold a synthetic anomaly of its held-out tasks (at most ``max_anomalous``),
    scored by the run's fold ensemble."""
    from monai.bundle import ConfigParser

    from scripts.ensemble import load_ensemble
    from scripts.plans import load_plan

    parser = ConfigParser()
    parser.read_meta(str(Path(bundle_root) / "configs" / "metadata.json"))
    parser.read_config(list(config_files))
    parser.update({"bundle_root": bundle_root, **overrides})
    get = parser.get_parsed_content
    dataset, device, models_dir = get("dataset_name"), get("device"), Path(get("model_dir")).parent
    plan = load_plan(models_dir, dataset)
    # what the models were trained with, from their plan: the grid, foreground, normalisation and network
    parser["plan"] = f"$scripts.plans.load_plan({str(models_dir)!r}, {dataset!r})"
    for key in ("spatial_size", "foreground_fraction", "patch_size", "sliding_window", "slice_axis"):
        parser[key] = plan[key]
    network = load_ensemble(get("network_def"), models_dir, dataset, device, plan=plan)
    normalise = get("normalise")
    scans = get("all_scans")
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
    record = calibrate(network, get("inferer"), normals, anomalous, plan["sample_score"], device,
                       get("amp"))
    return record_operating_points(models_dir, dataset, record,
                                   "synthetic validation of training: the training scans as normals, the validation "
                                   "samples of each fold's held-out tasks as anomalies, scored by the fold ensemble")


def _inference_parser(models_dir: str | os.PathLike, dataset: str, bundle_root: str | os.PathLike | None):
    from monai.bundle import ConfigParser

    bundle_root = str(bundle_root or Path(__file__).resolve().parents[1])
    parser = ConfigParser()
    parser.read_meta(str(Path(bundle_root) / "configs" / "metadata.json"))
    parser.read_config(bundle_configs(bundle_root, "inference", dataset))
    parser.update({"bundle_root": bundle_root, "models_dir": str(models_dir)})
    return parser


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
    parser = _inference_parser(models_dir, dataset, bundle_root)
    get = parser.get_parsed_content
    inputs, normals = _normals_of_folder(parser, normals_dir, max_normals)
    record = calibrate(get("network"), get("inferer"), normals, [], get("sample_score_method"), get("device"),
                       get("amp"))
    return record_operating_points(models_dir, dataset, record,
                                   f"normal scans of {Path(normals_dir).name!r} ({len(inputs)} scans), scored by the "
                                   "fold ensemble; no sensitivities (no anomalies)")


def check_on_normals(models_dir: str | os.PathLike, dataset: str, normals_dir: str | os.PathLike,
                     bundle_root: str | os.PathLike | None = None, max_normals: int | None = None) -> dict:
    """How the recorded operating points fare on a folder of normal scans, without changing them: for each recorded
    rate, the fraction of these scans above its sample threshold (and of their foreground voxels above its voxel
    threshold), to compare with the rate the threshold was set for."""
    parser = _inference_parser(models_dir, dataset, bundle_root)
    get = parser.get_parsed_content
    recorded = get("plan").get("operating_points")
    if not recorded:
        raise ValueError(f"the {dataset} models in {str(models_dir)!r} record no operating points to check")
    inputs, normals = _normals_of_folder(parser, normals_dir, max_normals)
    scores, tail = _score_normals(get("network"), get("inferer"), normals, get("sample_score_method"),
                                  get("device"), get("amp"))
    values = np.asarray(scores)
    return {
        "normal_scans": len(scores),
        "sample": {rate: {"threshold": t, "fraction_above": float((values > t).mean())}
                   for rate, t in recorded["sample"]["thresholds"].items()},
        "voxel": {rate: {"threshold": t, "fraction_above": tail.fraction_above(t)}
                  for rate, t in recorded["voxel"]["thresholds"].items()},
    }


def calibrate_from_training_data(models_dir: str | os.PathLike, dataset: str, training_dir: str | os.PathLike,
                                 foreign_dir: str | os.PathLike | None = None,
                                 cache_dir: str | os.PathLike | None = None,
                                 bundle_root: str | os.PathLike | None = None, max_normals: int | None = 200,
                                 max_anomalous: int | None = 100, overrides: Mapping | None = None) -> Path:
    """:func:`calibrate_training_run` for models trained earlier (e.g. the shipped ones): their training scans
    ``training_dir`` (and ``foreign_dir`` for ``poisson_inter``) with training's default settings and
    ``overrides``, the grid and normalisation from the plan. The decoded scans go to ``cache_dir``, by default a
    temporary folder removed afterwards."""
    import shutil
    import tempfile

    bundle_root = str(bundle_root or Path(__file__).resolve().parents[1])
    models_dir = Path(models_dir).resolve()
    if not (models_dir / dataset / "plans.json").is_file():
        raise FileNotFoundError(f"no plans.json in {str(models_dir / dataset)!r}")
    temporary = None if cache_dir else tempfile.mkdtemp(prefix="mood_calibration_cache_")
    try:
        settings = {"dataset_dir": str(training_dir), "output_dir": str(models_dir.parent),
                    "cache_dir": str(cache_dir or temporary), "num_workers": 0, **(overrides or {})}
        if foreign_dir:
            settings["foreign_dir"] = str(foreign_dir)
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
        from scripts.inference import describe_error

        raise SystemExit(f"calibration: {describe_error(err)}") from None
    print(path)
    return path


if __name__ == "__main__":
    main()
