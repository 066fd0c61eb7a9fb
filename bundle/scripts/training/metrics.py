"""Anomaly-detection metrics: pixel- and sample-level average precision, memory-lean, as Ignite metrics.

Average precision follows sklearn's definition, AP = sum_n (R_n - R_{n-1}) P_n over decreasing score
thresholds, which MOOD's evaluation uses (``sklearn.metrics.average_precision_score`` in the challenge's
scripts/evalresults.py, github.com/MIC-DKFZ/mood; www.synapse.org/mood). Pixel AP over many 3D volumes is
computed from per-bin counts of positive and negative voxels (scores quantised to ``bins`` levels in
[0, 1]): exact for the quantised scores, constant memory however many voxels are seen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from ignite.distributed import all_gather, all_reduce
from ignite.metrics import Metric
from sklearn.metrics import average_precision_score

from scripts.scores import sample_score

__all__ = [
    "PixelAveragePrecision",
    "SampleAveragePrecision",
    "average_precision_from_counts",
]

DEFAULT_BINS = 1 << 16


def average_precision_from_counts(positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """AP from counts of positive and negative items per score bin (bins in increasing score order).

    Items in one bin tie; sklearn treats tied scores the same way (one threshold for all of them).
    Returns 0.0 when there is no positive.
    """
    tp = positives.flip(0).double().cumsum(0)
    fp = negatives.flip(0).double().cumsum(0)
    total = float(tp[-1]) if tp.numel() else 0.0
    if total == 0:
        return 0.0
    precision = tp / (tp + fp).clamp_min(1.0)
    recall = tp / total
    recall_step = torch.diff(recall, prepend=torch.zeros(1, dtype=recall.dtype))
    return float((recall_step * precision).sum())


def _finite_scores(pred: torch.Tensor) -> torch.Tensor:
    """Scores in [0, 1] as float32; a non-finite score (a diverged network's NaN) counts as 0, the least anomalous,
    so the metric ranks that map low instead of failing (the best checkpoint so far is kept)."""
    return torch.nan_to_num(pred.detach().float(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)


def _as_list(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return list(x) if x.ndim > 0 else [x]
    return list(x)


class PixelAveragePrecision(Metric):
    """Voxel-level AP over every voxel of every sample seen (labels binarised at ``threshold``)."""

    def __init__(self, bins: int = DEFAULT_BINS, threshold: float = 0.5,
                 output_transform: Callable = lambda x: x, device="cpu") -> None:
        self.bins = bins
        self.threshold = threshold
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._positives = torch.zeros(self.bins, dtype=torch.int64, device=self._device)
        self._negatives = torch.zeros(self.bins, dtype=torch.int64, device=self._device)

    def update(self, output: Sequence) -> None:
        predictions, labels = output
        for pred, label in zip(_as_list(predictions), _as_list(labels)):
            scores = _finite_scores(pred).reshape(-1)
            index = (scores * (self.bins - 1)).round().long().to(self._device)
            positive = (label.detach().reshape(-1) >= self.threshold).to(self._device)
            self._positives += torch.bincount(index[positive], minlength=self.bins)
            self._negatives += torch.bincount(index[~positive], minlength=self.bins)

    def compute(self) -> float:
        positives = all_reduce(self._positives.clone())
        negatives = all_reduce(self._negatives.clone())
        return average_precision_from_counts(positives.cpu(), negatives.cpu())


class SampleAveragePrecision(Metric):
    """Scan-level AP: a sample is anomalous when any voxel's label reaches ``threshold``; its score is
    :func:`sample_score` of the predicted map."""

    def __init__(self, method: float | Mapping = 1e-2, threshold: float = 0.5,
                 output_transform: Callable = lambda x: x, device="cpu") -> None:
        self.method = method
        self.threshold = threshold
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._scores: list[float] = []
        self._labels: list[float] = []

    def update(self, output: Sequence) -> None:
        predictions, labels = output
        for pred, label in zip(_as_list(predictions), _as_list(labels)):
            self._scores.append(float(sample_score(_finite_scores(pred), self.method)))
            self._labels.append(float(label.detach().max() >= self.threshold))

    def compute(self) -> float:
        scores = torch.tensor(self._scores, dtype=torch.float64, device=self._device)
        labels = torch.tensor(self._labels, dtype=torch.float64, device=self._device)
        scores, labels = all_gather(scores).cpu().numpy(), all_gather(labels).cpu().numpy()
        if labels.min(initial=1.0) == labels.max(initial=0.0):
            return 0.0  # AP is undefined without both normal and anomalous samples
        return float(average_precision_score(labels, scores))
