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

from scripts.classifier.features import FeatureBank, NormativeStatistics, check_sha256

__all__ = ["VoxelClassifierEnsemble", "classifier_files", "load_booster", "load_classifier"]

logger = logging.getLogger(__name__)


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
    (:func:`scripts.classifier.features.scored_voxels`) get 0."""

    def __init__(self, bank: FeatureBank, folds: list[tuple[object, NormativeStatistics]]) -> None:
        super().__init__()
        if not folds:
            raise ValueError("a classifier ensemble needs at least one fold")
        self.bank = bank
        self.folds = folds

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
        total = np.zeros(len(shared["voxels"]), np.float64)
        for booster, normative in self.folds:
            total += booster.predict(self.bank.rows(shared, normative))
        probabilities = np.zeros(int(np.prod(shared["shape"])), np.float32)
        probabilities[shared["voxels"]] = total / len(self.folds)
        return probabilities.reshape(1, *shared["shape"])


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
    return VoxelClassifierEnsemble(bank, members).eval()
