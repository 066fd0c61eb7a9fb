"""MONAI dictionary transforms that wrap the synthetic-anomaly engine for bundle configs."""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, Transform
from monai.utils import convert_to_dst_type

from scripts.anomalies import TASK_NEEDS, TASKS, synthesize

__all__ = ["FiniteIntensityd", "ForegroundMaskd", "NormaliseIntensityd", "RandSyntheticAnomalyd"]

NO_ANOMALY = "none"


class RandSyntheticAnomalyd(Randomizable, MapTransform):
    """Add 1 to 4 synthetic anomalies of one randomly chosen task and write their soft label map.

    Args:
        keys: the image key (one key; stack modalities as channels).
        partner_key: another scan of the same dataset, same spatial shape (needed by ``fpi`` and
            ``poisson_intra``; those tasks are skipped for a sample without it).
        foreground_key: boolean foreground mask of the image (channel-first or not); if the key is
            absent the engine uses the voxels above the image's minimum.
        label_key: where the label map (1, *spatial) in [0, 1] is written.
        foreign_key: a scan of another dataset for ``poisson_inter``; None skips that task.
        tasks: names from ``scripts.anomalies.TASKS`` to choose from (default: all available).
        prob: probability that a sample gets anomalies at all; otherwise its label is all zeros.
        task_key: where the chosen task's name (or ``"none"``) is written, for per-task validation.
        sigma, max_anomalies, continue_probability, min_overlap, interpolation_label: engine settings,
            see ``scripts.anomalies.synthesize``.

    Randomness comes only from ``self.R`` in ``randomize()`` (the task and a seed for the engine's
    ``torch.Generator``), so ``set_random_state(seed)`` reproduces the output bit for bit. Numpy, torch and
    MetaTensor inputs are accepted; the outputs have the input's type, and MetaTensor metadata is kept on
    both the image and the label.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        partner_key: str | None = "partner",
        foreground_key: str | None = "foreground",
        label_key: str = "label",
        foreign_key: str | None = None,
        tasks: Sequence[str] | None = None,
        prob: float = 1.0,
        task_key: str | None = "anomaly_task",
        sigma: float = 0.2,
        max_anomalies: int = 4,
        continue_probability: float = 0.5,
        min_overlap: float = 0.5,
        interpolation_label: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(
                f"RandSyntheticAnomalyd takes one image key (stack modalities as channels), got {self.keys}"
            )
        tasks = list(TASKS) if tasks is None else list(tasks)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"unknown or no tasks {unknown or tasks}; available: {sorted(TASKS)}")
        if foreign_key is None:
            tasks = [t for t in tasks if TASK_NEEDS[t] != "foreign"]
        if partner_key is None:
            tasks = [t for t in tasks if TASK_NEEDS[t] != "partner"]
        if not tasks:
            raise ValueError("no task left: the chosen tasks need a partner_key/foreign_key that is not set")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.tasks = tasks
        self.partner_key = partner_key
        self.foreground_key = foreground_key
        self.label_key = label_key
        self.foreign_key = foreign_key
        self.prob = prob
        self.task_key = task_key
        self.engine_kwargs = dict(
            sigma=sigma,
            max_anomalies=max_anomalies,
            continue_probability=continue_probability,
            min_overlap=min_overlap,
            interpolation_label=interpolation_label,
        )
        self._task: str = NO_ANOMALY
        self._seed: int = 0

    def _available_tasks(self, data: Mapping[Hashable, object]) -> list[str]:
        have = {"partner": self.partner_key in data, "foreign": self.foreign_key in data, None: True}
        return [t for t in self.tasks if have[TASK_NEEDS[t]]]

    def randomize(self, data: Sequence[str] | None = None) -> None:
        """Choose the task (or none, with probability 1 - prob) and the engine's seed from ``self.R``."""
        candidates = list(data) if data is not None else self.tasks
        apply = self.R.random_sample() < self.prob
        self._task = candidates[self.R.randint(len(candidates))] if apply and candidates else NO_ANOMALY
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        key = self.first_key(d)
        if key == []:  # allow_missing_keys and the image is absent
            return d
        self.randomize(self._available_tasks(d))
        image = d[key]
        image_t = torch.as_tensor(image.as_tensor() if isinstance(image, MetaTensor) else image)
        if not image_t.is_floating_point():
            image_t = image_t.float()

        if self._task == NO_ANOMALY:
            out = image_t
            label = torch.zeros((1, *image_t.shape[1:]), dtype=image_t.dtype, device=image_t.device)
        else:
            gen = torch.Generator().manual_seed(self._seed)
            out, label, _ = synthesize(
                image_t,
                gen,
                self._task,
                foreground=self._tensor(d.get(self.foreground_key), image_t, spatial_only=True),
                partner=self._tensor(d.get(self.partner_key), image_t),
                foreign=self._tensor(d.get(self.foreign_key), image_t),
                **self.engine_kwargs,
            )
        d[key] = self._like(out, image)
        d[self.label_key] = self._like(label, image)
        if self.task_key is not None:
            d[self.task_key] = self._task
        return d

    @staticmethod
    def _tensor(value, image: torch.Tensor, spatial_only: bool = False) -> torch.Tensor | None:
        if value is None:
            return None
        t = torch.as_tensor(value.as_tensor() if isinstance(value, MetaTensor) else value).to(image.device)
        if spatial_only:
            spatial = tuple(image.shape[1:])
            if tuple(t.shape) != spatial:
                if t.ndim == len(spatial) + 1 and t.shape[0] == 1:
                    t = t[0]
                else:
                    raise ValueError(
                        f"foreground shape {tuple(t.shape)} does not match the image's spatial shape {spatial}"
                    )
            return t.bool()
        return t

    @staticmethod
    def _like(result: torch.Tensor, reference):
        """``result`` as the type of ``reference``: numpy, torch, or a MetaTensor carrying its metadata."""
        if isinstance(reference, MetaTensor):
            return MetaTensor(result, meta=reference.meta, applied_operations=list(reference.applied_operations))
        if isinstance(reference, np.ndarray):
            return result.cpu().numpy()
        return convert_to_dst_type(result, reference, dtype=result.dtype)[0]


def _as_tensor(value) -> torch.Tensor:
    return value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)


def _strided_values(image: torch.Tensor, limit: int = 1 << 22) -> torch.Tensor:
    """A regular subsample of at most about ``limit`` values of ``image``, for order statistics."""
    step = max(1, int(round((image.numel() / limit) ** (1.0 / max(image.ndim - 1, 1)))))
    return image[(slice(None), *([slice(None, None, step)] * (image.ndim - 1)))].reshape(-1)


class FiniteIntensityd(Transform):
    """Replace NaN by the lowest finite intensity (background) and +-Inf by the highest / lowest finite
    one, so that a scan with a few broken voxels is still scored. An image without any finite voxel
    becomes all zeros."""

    def __init__(self, keys: str = "image") -> None:
        self.key = keys

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image = d[self.key]
        values = _as_tensor(image)
        finite = torch.isfinite(values)
        if bool(finite.all()):
            return d
        if bool(finite.any()):
            low, high = float(values[finite].min()), float(values[finite].max())
        else:
            low = high = 0.0
        fixed = torch.nan_to_num(values.float(), nan=low, posinf=high, neginf=low)
        d[self.key] = convert_to_dst_type(fixed, image, dtype=fixed.dtype)[0]
        return d


class ForegroundMaskd(Transform):
    """Foreground mask by a data-relative threshold: voxels above ``min + fraction * (p99 - min)``.

    The threshold sits between the background (the image's minimum: 0 in MRI, air in CT) and the bright end
    of the intensities, so it needs no modality-specific constant and works in any unit. Writes a boolean
    mask (1, *spatial) to ``foreground_key``; an image without such voxels gets an all-true mask.
    """

    def __init__(self, keys: str = "image", foreground_key: str = "foreground", fraction: float = 0.1) -> None:
        self.key = keys
        self.foreground_key = foreground_key
        self.fraction = fraction

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image = _as_tensor(d[self.key]).float()
        values = _strided_values(image)
        values = values[torch.isfinite(values)]
        if values.numel() == 0:
            mask = torch.ones(image.shape[1:], dtype=torch.bool)
        else:
            low = values.min()
            high = values.kthvalue(max(1, int(0.99 * values.numel()))).values
            mask = (image > low + self.fraction * (high - low)).any(dim=0)
            if not bool(mask.any()):
                mask = torch.ones_like(mask)
        d[self.foreground_key] = mask[None]
        return d


class NormaliseIntensityd(Transform):
    """Intensity normalisation for MRI and CT, from the scan or from the training data.

    ``mode="zscore"`` (MRI, as in the paper): subtract the mean and divide by the standard deviation of the
    scan's own foreground. ``mode="fingerprint"`` (CT, as nnU-Net): clip to the training data's foreground
    0.5 and 99.5 percentiles and standardise with its mean and standard deviation, all read from
    ``fingerprint`` (a dict or a JSON file written by training). Both are derived from data, so CT in
    Hounsfield units and CT rescaled to [0, 1] come out alike.
    """

    def __init__(
        self, keys: str = "image", foreground_key: str = "foreground", mode: str = "zscore",
        fingerprint: dict | str | Path | None = None,
    ) -> None:
        if mode not in ("zscore", "fingerprint"):
            raise ValueError(f"mode must be 'zscore' or 'fingerprint', got {mode!r}")
        if mode == "fingerprint":
            if fingerprint is None:
                raise ValueError("mode='fingerprint' needs the training data's fingerprint (dict or JSON path)")
            if not isinstance(fingerprint, Mapping):
                fingerprint = json.loads(Path(fingerprint).read_text())
        self.key = keys
        self.foreground_key = foreground_key
        self.mode = mode
        self.fingerprint = fingerprint

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image = d[self.key]
        values = _as_tensor(image).float()
        if self.mode == "fingerprint":
            fp = self.fingerprint
            values = values.clamp(fp["percentile_00_5"], fp["percentile_99_5"])
            out = (values - fp["mean"]) / max(fp["std"], 1e-8)
        else:
            foreground = d.get(self.foreground_key)
            mask = (
                _as_tensor(foreground).bool().reshape(values.shape[1:])
                if foreground is not None else torch.ones(values.shape[1:], dtype=torch.bool)
            )
            selected = values[:, mask] if bool(mask.any()) else values.reshape(values.shape[0], -1)
            std = float(selected.std()) if selected.numel() > 1 else 0.0
            out = (values - selected.mean()) / (std if std > 1e-8 else 1.0)
        d[self.key] = convert_to_dst_type(out, image, dtype=torch.float32)[0]  # keeps MetaTensor metadata
        return d
