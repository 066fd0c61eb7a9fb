"""Operating points of a trained ensemble: thresholds at stated false-positive rates on normal scans, how they
are measured (:func:`calibrate`), recorded in the plan and chosen for a run (:func:`operating_point`). The command
that measures them is :mod:`scripts.calibration`."""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import date
from pathlib import Path

import numpy as np
import torch

from scripts.classifier.model import classifier_files
from scripts.io.files import MODEL_SUFFIXES, load_json, save_json
from scripts.scores import sample_score

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


def _map(predictor, image: torch.Tensor) -> torch.Tensor:
    """The ensemble's map of one preprocessed, normalised scan (channel first) on its working grid, (D, H, W)."""
    return predictor.predict_map(torch.as_tensor(image)[None])[0, 0].float()


def _score_normals(predictor, normals: Iterable[Mapping],
                   method: float | Mapping) -> tuple[list[float], VoxelTail]:
    """The sorted sample scores of ``normals`` (rounded as recorded) and the histogram of their foreground voxels."""

    scores, tail = [], VoxelTail()
    for index, item in enumerate(normals, 1):
        _progress("normal scan", index)
        probabilities = _map(predictor, item["image"])
        scores.append(float(sample_score(probabilities, method)))
        foreground = torch.as_tensor(item["foreground"])[0].to(probabilities.device) > 0
        tail.add(probabilities[foreground] if foreground.any() else probabilities)
    if not scores:
        raise ValueError("no normal scans to calibrate on")
    return sorted(round(s, 6) for s in scores), tail  # as recorded: inference sets thresholds from these


def calibrate(predictor, normals: Iterable[Mapping], anomalous: Iterable[Mapping], method: float | Mapping,
              fprs: Sequence[float] = DEFAULT_FPRS,
              voxel_fprs: Sequence[float] = DEFAULT_VOXEL_FPRS) -> dict:
    """The operating points of ``predictor`` (:class:`scripts.inference.predictor.Predictor`: its fold ensemble's
    probabilities, :meth:`~scripts.inference.predictor.Predictor.predict_map`) from ``normals``
    (preprocessed, normalised scans: ``image`` and ``foreground``) and ``anomalous`` (samples with ``image`` and
    their synthetic ``label``; may be empty): the normal scores and the sample thresholds at ``fprs``, the voxel
    thresholds at ``voxel_fprs`` over the normals' foreground voxels, and, with anomalous samples, the fraction of
    them (and of their anomalous voxels, label >= 0.5) above each threshold."""

    normal_scores, tail = _score_normals(predictor, normals, method)
    sample_thresholds = {str(r): score_threshold(normal_scores, r) for r in fprs}
    voxel_thresholds = {str(r): tail.threshold(r) for r in voxel_fprs}
    anomalous_scores, anomalous_voxels = [], {key: 0 for key in voxel_thresholds}
    voxels_in_anomalies = 0
    for index, item in enumerate(anomalous, 1):
        _progress("anomalous sample", index)
        probabilities = _map(predictor, item["image"])
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
    """SHA-256 of each model fold's files (networks' state dicts, classifiers' trees and normals' statistics): an
    operating point holds only for the models it was measured with."""
    folder = Path(models_dir) / dataset
    patterns = (f"fold_*{MODEL_SUFFIXES['pytorch']}", *classifier_files("*"))  # the classifier's own file names
    files = [p for pattern in patterns for p in folder.glob(pattern)]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


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
