"""The voxel classifier's files and its fold ensemble at inference.

A models folder of this kind holds, per model fold ``k``, ``classifier_<k>.txt`` (LightGBM's own text model: read
by parsing, never unpickled) and ``normative_<k>.npz`` (the statistics of that fold's training normals,
:class:`scripts.classifier.features.NormativeStatistics`). The plan's ``classifier`` record names the feature bank
and the learner, and, once training has finished, every file's SHA-256 (``files``): a file that is not the one
recorded is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from scipy import ndimage as ndi

from scripts.classifier.features import FeatureBank, NormativeStatistics, check_sha256

__all__ = ["VoxelClassifierEnsemble", "classifier_files", "load_booster", "load_classifier", "scoring_record"]

logger = logging.getLogger(__name__)


def scoring_record(coarse_stride: int | None = 2, refine_top: float = 0.02) -> dict | None:
    """The plan's record of how a scan's map is scored (``classifier.scoring``): the trees on every
    ``coarse_stride``-th voxel along each axis first; then on every voxel within one coarse step of the scan's top
    ``refine_top`` of those coarse probabilities, and near the foreground's edge; the other voxels take the coarse
    map, trilinearly interpolated. None (``coarse_stride`` None or 1): the trees on every voxel. Why: the trees are
    most of a scan's cost (about 3.4 s per fold per million voxels on 2 cores), and most of a scan is plainly
    normal; relative to the scan, because a classifier's probabilities on normal tissue are not all small."""
    if coarse_stride is None or int(coarse_stride) == 1:
        return None
    if int(coarse_stride) < 1 or not 0.0 < float(refine_top) <= 1.0:
        raise ValueError(f"coarse_stride must be a positive integer and refine_top in (0, 1], got {coarse_stride} "
                         f"and {refine_top}")
    return {"coarse_stride": int(coarse_stride), "refine_top": float(refine_top)}


def _subset(shared: Mapping, index: np.ndarray) -> dict:
    """The shared features of ``shared`` at its voxels ``index`` (positions in ``shared["voxels"]``)."""
    return {**shared, "voxels": shared["voxels"][index],
            "columns": {name: values[index] for name, values in shared["columns"].items()}}


def classifier_files(fold: int) -> tuple[str, str]:
    """The file names of model fold ``fold``: its trees and its normals' statistics."""
    return f"classifier_{fold}.txt", f"normative_{fold}.npz"


def load_booster(path: str | Path, sha256: str | None, threads: int | None = None):
    """A LightGBM booster from its text model ``path``, if its SHA-256 is ``sha256``."""
    import lightgbm

    check_sha256(path, sha256)
    text = Path(path).read_text()
    booster = lightgbm.Booster(model_str=text, params={"num_threads": threads or torch.get_num_threads()})
    return booster


class VoxelClassifierEnsemble(torch.nn.Module):
    """The fold classifiers of a models folder behind the ensemble's contract: a preprocessed, normalised batch
    (B, 1, *spatial) in, anomaly probabilities of the same shape out (the mean of the folds'); the feature bank's
    shared features are computed once per scan, the normative ones per fold. Voxels the bank does not score
    (:func:`scripts.classifier.features.scored_voxels`) get 0. ``scoring``: the plan's
    :func:`scoring_record` (None: the trees score every voxel)."""

    def __init__(self, bank: FeatureBank, folds: list[tuple[object, NormativeStatistics]],
                 scoring: Mapping | None = None) -> None:
        super().__init__()
        if not folds:
            raise ValueError("a classifier ensemble needs at least one fold")
        self.bank = bank
        self.folds = folds
        self.scoring = scoring_record(**scoring) if scoring else None
        self.last_fraction_scored = 1.0  # the share of the scored voxels the trees saw in the last scan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = x.as_tensor() if isinstance(x, MetaTensor) else x
        maps = []
        for image in plain.detach().float().cpu().numpy():
            maps.append(self.scan_map(image))
        out = torch.from_numpy(np.stack(maps)).to(x.device)
        if isinstance(x, MetaTensor):  # keep the input's metadata for Invertd downstream, as torch layers do
            out = MetaTensor(out)
            out.copy_meta_from(x)
        return out

    def scan_map(self, image: np.ndarray) -> np.ndarray:
        """The probability map (1, *spatial) of one scan (1, *spatial)."""
        shared = self.bank.shared(image)
        probabilities = np.zeros(int(np.prod(shared["shape"])), np.float32)
        self.last_fraction_scored = 1.0
        probabilities[shared["voxels"]] = (self._coarse_to_fine(shared) if self.scoring
                                           else self._trees(shared, slice(None)))
        return probabilities.reshape(1, *shared["shape"])

    def _trees(self, shared: Mapping, index) -> np.ndarray:
        """The folds' mean probability at the voxels ``index`` of ``shared``."""
        part = shared if isinstance(index, slice) else _subset(shared, index)
        total = np.zeros(len(part["voxels"]), np.float64)
        if len(total):
            for booster, normative in self.folds:
                total += booster.predict(self.bank.rows(part, normative))
        return (total / len(self.folds)).astype(np.float32)

    def _coarse_to_fine(self, shared: Mapping) -> np.ndarray:
        """The probabilities at ``shared["voxels"]``: the trees on the coarse lattice, then on every voxel near the
        top ``refine_top`` of the coarse probabilities or near a lattice point that is not scored (the foreground's
        edge); the rest the coarse map, trilinearly interpolated from scored lattice points only."""
        stride, top = self.scoring["coarse_stride"], self.scoring["refine_top"]
        shape, voxels = shared["shape"], shared["voxels"]
        coordinates = np.stack(np.unravel_index(voxels, shape))
        on_lattice = np.all(coordinates % stride == 0, axis=0)
        values = np.empty(len(voxels), np.float32)
        values[on_lattice] = self._trees(shared, np.flatnonzero(on_lattice))
        coarse_shape = tuple(-(-s // stride) for s in shape)
        coarse = np.zeros(coarse_shape, np.float32)
        scored = np.zeros(coarse_shape, bool)
        lattice = tuple(coordinates[:, on_lattice] // stride)
        coarse[lattice], scored[lattice] = values[on_lattice], True
        threshold = np.quantile(values[on_lattice], 1.0 - top) if on_lattice.any() else 0.0
        # a voxel's interpolation reads the lattice points of its block and the next along each axis: refine it when
        # one of them is near the top, or is not scored (its 0 would pull the voxel down: the foreground's edge)
        near = ndi.maximum_filter(coarse, size=3, mode="nearest") >= threshold
        complete = ndi.minimum_filter(scored.view(np.uint8), size=3, mode="nearest").astype(bool)
        block = tuple(coordinates[:, ~on_lattice] // stride)
        off = np.flatnonzero(~on_lattice)
        refine = near[block] | ~complete[block]
        values[off[refine]] = self._trees(shared, off[refine])
        rest = off[~refine]
        values[rest] = ndi.map_coordinates(coarse, coordinates[:, rest] / stride, order=1, mode="nearest")
        self.last_fraction_scored = (on_lattice.sum() + refine.sum()) / max(len(voxels), 1)
        return values


def load_classifier(models_dir: str | Path, dataset: str, plan: Mapping, allow_partial: bool = False
                    ) -> VoxelClassifierEnsemble:
    """The plan's classifier folds from ``models_dir/<dataset>``, every file checked against the SHA-256 the plan
    recorded; a fold of the split that is missing is refused unless ``allow_partial``."""
    record = plan["classifier"]
    folder = Path(models_dir) / dataset
    recorded = record.get("files") or {}
    folds = [f["fold"] for f in plan["split"]["model_folds"]] if plan.get("split") else sorted(
        int(p.stem.split("_")[1]) for p in folder.glob("classifier_*.txt"))
    present = [k for k in folds if all((folder / name).is_file() for name in classifier_files(k))]
    missing = sorted(set(folds) - set(present))
    if not present:
        raise FileNotFoundError(f"no trained classifier for {dataset!r}: no classifier_<k>.txt with its "
                                f"normative_<k>.npz in {str(folder)!r}; train with 'make train' or pass --models_dir")
    if missing and not allow_partial:
        raise ValueError(f"{str(folder)!r} holds {len(present)} of the {len(folds)} classifier folds its plan trained "
                         f"(folds {missing} missing): finish training them, or pass --allow_partial_ensemble "
                         "(monai.bundle run: --allow_partial_ensemble true)")
    bank = FeatureBank(record["features"])
    members = []
    for k in present:
        model, normative = (folder / name for name in classifier_files(k))
        members.append((load_booster(model, recorded.get(model.name)),
                        NormativeStatistics.load(normative, recorded.get(normative.name))))
    logger.info("ensemble of %d voxel classifier folds from %s", len(members), folder)
    return VoxelClassifierEnsemble(bank, members, record.get("scoring")).eval()
