"""Post-processing of the anomaly maps into the MOOD outputs (MOOD challenge submission format,
github.com/MIC-DKFZ/mood): the pixel map as a float32 NIfTI on the input's grid, and the sample score, one float
in [0, 1] per scan, aggregated from the map. MONAI-style dictionary transforms, run by the inference workflow's
evaluator on every decollated case."""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.files import write_atomically
from scripts.inference import ERROR, NAME, PATH, readable_path

__all__ = ["WritePixelMapd", "WriteSampleScored", "sample_score"]

logger = logging.getLogger(__name__)


def sample_score(prediction: torch.Tensor, top_fraction: float = 1e-2) -> torch.Tensor:
    """Scan-level score from an anomaly map: the mean of its ``top_fraction`` highest voxels (at least one)."""
    flat = prediction.reshape(-1).float()
    k = max(1, int(round(top_fraction * flat.numel())))
    return flat.topk(k).values.mean()


def _remove_stale(path: Path) -> None:
    """A case that fails now must not leave an earlier run's output in place."""
    if path.is_file() or path.is_symlink():
        path.unlink()
        logger.warning("%s: removed the output of an earlier run", path)


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, MetaTensor):
        x = x.as_tensor()
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


def _finite_affine(source, pred) -> np.ndarray:
    """The input's affine, or when its header's is not finite (a NaN sform) the one MONAI's reader fell back to,
    which the map carries after the inverse transforms."""
    affine = np.asarray(source.affine, dtype=np.float64)
    if np.isfinite(affine).all():
        return affine
    if isinstance(pred, MetaTensor) and np.isfinite(np.asarray(pred.affine)).all():
        return np.asarray(pred.affine, dtype=np.float64)
    return np.eye(4)


class WritePixelMapd(MapTransform):
    """Writes ``<output_dir>/<input name>``: the anomaly map as a float32 NIfTI with the input file's shape
    and affine (MOOD pixel task). Expects the map already brought back to the input grid and clamped."""

    def __init__(self, keys: str = "pred", output_dir: str | Path = ".", allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if d.get(ERROR):
            logger.error("%s: no pixel map written: %s", d[NAME], d[ERROR])
            _remove_stale(self.output_dir / d[NAME])
            return d
        source = nib.load(readable_path(d[PATH]))
        for key in self.key_iterator(d):
            values = _to_numpy(d[key])
            if values.size != int(np.prod(source.shape)):
                raise ValueError(f"{d[NAME]}: map of shape {values.shape} does not fit the input's {source.shape}")
            values = np.clip(np.nan_to_num(values.reshape(source.shape), nan=0.0), 0.0, 1.0).astype(np.float32)
            header = source.header.copy()
            header.set_data_dtype(np.float32)
            header.set_slope_inter(1.0, 0.0)
            out = nib.Nifti1Image(values, _finite_affine(source, d.get(key)), header)
            d["written"] = str(write_atomically(self.output_dir / d[NAME], lambda tmp, image=out: nib.save(image, tmp)))
        return d


class WriteSampleScored(MapTransform):
    """Writes ``<output_dir>/<input name>.txt`` with one float in [0, 1] (MOOD sample task): the mean of the
    ``top_fraction`` highest voxels of the working-grid map (:func:`sample_score`, the same
    aggregation as training's validation). A scan that could not be read gets ``fallback_score``."""

    def __init__(self, keys: str = "pred", output_dir: str | Path = ".", top_fraction: float = 1e-2,
                 fallback_score: float = 1.0, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= fallback_score <= 1.0:
            raise ValueError(f"fallback_score must be in [0, 1], got {fallback_score}")
        self.output_dir = Path(output_dir)
        self.top_fraction = top_fraction
        self.fallback_score = fallback_score

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if d.get(ERROR):
            logger.error("%s: could not be read (%s); writing the fallback score %s", d[NAME], d[ERROR],
                         self.fallback_score)
            score = self.fallback_score
        else:
            key = self.first_key(d)
            values = torch.nan_to_num(torch.as_tensor(_to_numpy(d[key])), nan=0.0)
            score = float(sample_score(values, self.top_fraction).clamp(0.0, 1.0))
        if not math.isfinite(score):
            score = self.fallback_score
        path = write_atomically(self.output_dir / f"{d[NAME]}.txt", lambda tmp: tmp.write_text(f"{score:.6f}\n"))
        d["score"], d["written"] = score, str(path)
        return d
