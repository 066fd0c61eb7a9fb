"""MONAI transforms for the bundle configs: preprocessing (array + dictionary pairs, as in
``monai.transforms.intensity``) and the synthetic-anomaly transform ``RandSyntheticAnomalyd``."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import Compose, MapTransform, RandomizableTransform, Transform
from monai.transforms.transform import apply_transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

from scripts.anomalies import TASK_NEEDS, TASKS, synthesize
from scripts.plans import NORMALISATION_MODES

__all__ = [
    "FiniteIntensity",
    "FiniteIntensityd",
    "IntensityForeground",
    "IntensityForegroundd",
    "NormaliseIntensity",
    "NormaliseIntensityd",
    "RadiographIntensity",
    "RadiographIntensityd",
    "RandSyntheticAnomalyd",
    "TimedCompose",
]

NO_ANOMALY = "none"
logger = logging.getLogger(__name__)


def _tensor(value: NdarrayOrTensor, device: torch.device | None = None) -> torch.Tensor:
    """``value`` as a plain torch tensor (MetaTensor metadata dropped), as MONAI's ``convert_to_tensor``."""
    return convert_to_tensor(value, track_meta=False, device=device)


def _strided_values(image: torch.Tensor, limit: int = 1 << 22) -> torch.Tensor:
    """A regular subsample of at most about ``limit`` values of ``image``, for order statistics."""
    step = max(1, int(round((image.numel() / limit) ** (1.0 / max(image.ndim - 1, 1)))))
    return image[(slice(None), *([slice(None, None, step)] * (image.ndim - 1)))].reshape(-1)


# Beyond 2^60 in magnitude the squares that a z-score sums overflow float32 (2^128); below 2^-60 a float64
# scan's values round to zero in float32. Scans are far inside: HU are below 2^12, MR arbitrary units below 2^20.
SAFE_MAGNITUDE = 2.0**60


def _source(img: NdarrayOrTensor) -> str:
    """The file an image came from (MONAI's ``filename_or_obj``), for log lines."""
    meta = getattr(img, "meta", None) or {}
    return str(meta.get("filename_or_obj") or "an image")


class FiniteIntensity(Transform):
    """Make a scan's intensities finite float32 before anything casts or sums them, so that a scan with a few
    broken voxels, or in an odd unit, is still scored:

    - NaN becomes the lowest in-range intensity (background), +-Inf and finite values beyond
      ``SAFE_MAGNITUDE`` (1e300 in a float64 file) the highest / lowest in-range one, as
      ``torch.nan_to_num`` with data-derived values;
    - a scan whose typical magnitude (99th percentile of its nonzero ``|x|``) lies outside
      [1 / SAFE_MAGNITUDE, SAFE_MAGNITUDE] is first rescaled by a power of two (exact; a z-score does not
      change), so a float64 scan x 1e300 or x 1e-300 is not cast to Inf or to zeros.

    Use it right after ``LoadImaged(dtype=None)``, which keeps the file's own data type. The output is float32
    of the input's type (numpy, torch or MetaTensor with its metadata); a float32 scan that needs nothing is
    returned as is. Every repair is logged with the file's name. An image without any finite voxel becomes all
    zeros."""

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        values = _tensor(img)
        if values.dtype == torch.bool:
            values = values.to(torch.uint8)
        if values.numel() and self._in_range(values):
            if values.dtype == torch.float32:
                return img
            return convert_to_dst_type(values.float(), img, dtype=torch.float32)[0]
        return convert_to_dst_type(self._repair(values, _source(img)), img, dtype=torch.float32)[0]

    @staticmethod
    def _in_range(values: torch.Tensor) -> bool:
        low, high = (float(v) for v in torch.aminmax(values))  # NaN if any voxel is NaN
        magnitude = max(abs(low), abs(high))
        return math.isfinite(magnitude) and (magnitude == 0 or 1 / SAFE_MAGNITUDE <= magnitude <= SAFE_MAGNITUDE)

    @staticmethod
    def _repair(values: torch.Tensor, source: str) -> torch.Tensor:
        values = values.double() if not values.is_floating_point() else values
        finite = torch.isfinite(values)
        if not bool(finite.any()):
            logger.warning("%s: no finite intensity; scored as a blank image", source)
            return torch.zeros(values.shape, dtype=torch.float32, device=values.device)
        notes = []
        magnitude = _strided_values(torch.where(finite, values, 0).abs())
        magnitude = magnitude[magnitude > 0]
        if magnitude.numel():
            typical = float(torch.quantile(magnitude.double(), 0.99))
            if not 1 / SAFE_MAGNITUDE <= typical <= SAFE_MAGNITUDE:
                exponent = -round(math.log2(typical))
                half = torch.tensor(exponent // 2, dtype=torch.float64)  # in two steps: 2^1063 alone is Inf
                values = torch.ldexp(torch.ldexp(values.double(), half), exponent - half)
                notes.append(f"rescaled by 2^{exponent}")
        in_range = torch.isfinite(values) & (values.abs() <= SAFE_MAGNITUDE)
        broken = int(values.numel() - in_range.sum())
        if not bool(in_range.any()):
            low = high = 0.0
        else:
            low, high = float(values[in_range].min()), float(values[in_range].max())
        if broken:
            notes.append(f"{broken} NaN, infinite or out-of-range voxels set to the in-range extremes")
            values = torch.where(in_range, values, torch.where(values > 0, high, low))  # NaN > 0 is False
        logger.warning("%s: intensities repaired: %s", source, "; ".join(notes))
        return values.float()


class FiniteIntensityd(MapTransform):
    """Dictionary wrapper of :class:`FiniteIntensity`."""

    backend = FiniteIntensity.backend

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.finite = FiniteIntensity()

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.finite(d[key])
        return d


class IntensityForeground(Transform):
    """Foreground mask by a data-relative threshold: voxels above ``min + fraction * (p99 - min)`` in any
    channel.

    The threshold sits between the background (the image's minimum: 0 in MRI, air in CT) and the bright end
    of the intensities, so it needs no modality-specific constant and works in any unit. Unlike MONAI's
    Otsu-based ``ForegroundMask`` it needs no histogram fit. Returns a boolean mask (1, *spatial) of the
    input's type; an image without such voxels gets an all-true mask.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, fraction: float = 0.1) -> None:
        self.fraction = fraction

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        image = _tensor(img).float()
        values = _strided_values(image)
        values = values[torch.isfinite(values)]
        if values.numel() == 0:
            mask = torch.ones(image.shape[1:], dtype=torch.bool, device=image.device)
        else:
            low = values.min()
            high = values.kthvalue(max(1, int(0.99 * values.numel()))).values
            mask = (image > low + self.fraction * (high - low)).any(dim=0)
            if not bool(mask.any()):
                mask = torch.ones_like(mask)
        return convert_to_dst_type(mask[None], img, dtype=torch.bool)[0]


class IntensityForegroundd(MapTransform):
    """Dictionary wrapper of :class:`IntensityForeground`: the mask of the image at ``keys`` (one key; stack
    modalities as channels) is written to ``foreground_key``."""

    backend = IntensityForeground.backend

    def __init__(
        self,
        keys: KeysCollection = "image",
        foreground_key: str = "foreground",
        fraction: float = 0.1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(
                f"IntensityForegroundd takes one image key (stack modalities as channels), got {self.keys}"
            )
        self.foreground_key = foreground_key
        self.foreground = IntensityForeground(fraction)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.foreground_key] = self.foreground(d[key])
        return d


class NormaliseIntensity(Transform):
    """Intensity normalisation for MRI and CT, from the scan or from the training data.

    ``mode="zscore"`` (MRI, as in Baugh et al., "Many tasks make light work", MICCAI 2023): subtract the mean
    and divide by the standard deviation of the scan's own foreground (``mask`` of ``__call__``; the whole
    image without one). ``mode="robust"`` (CT): the same after clipping to the scan's own foreground 0.5 and
    99.5 percentiles, nnU-Net's CT clipping taken per scan, so that metal and air do not dominate the
    statistics. ``mode="fingerprint"`` (CT, as nnU-Net: Isensee et al., Nature Methods 2021): clip to the
    training data's foreground 0.5 and 99.5 percentiles and standardise with its mean and standard deviation,
    all read from ``fingerprint`` (a dict or a JSON file written by training). ``mode="none"``: unchanged, for
    images the preprocessing has normalised already (radiographs, :class:`RadiographIntensity`).

    ``zscore`` and ``robust`` give the same output for a scan under any increasing affine rescaling of its
    intensities (Hounsfield units, [0, 1], ``x * 3 + 100``); ``fingerprint`` fixes the unit of the training
    data, so a model trained on HU misreads CT given in [0, 1]. Returns float32 of the input's type.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, mode: str = "zscore", fingerprint: Mapping | str | Path | None = None) -> None:
        if mode not in NORMALISATION_MODES:
            raise ValueError(f"mode must be one of {NORMALISATION_MODES}, got {mode!r}")
        if mode == "fingerprint":
            if fingerprint is None:
                raise ValueError("mode='fingerprint' needs the training data's fingerprint (dict or JSON path)")
            if not isinstance(fingerprint, Mapping):
                fingerprint = json.loads(Path(fingerprint).read_text())
        self.mode = mode
        self.fingerprint = fingerprint

    def parameters(self, img: NdarrayOrTensor, mask: NdarrayOrTensor | None = None) -> tuple[float, ...]:
        """``(low, high, mean, scale)``: the scan's normalisation is ``(clamp(x, low, high) - mean) / scale`` (no
        clamp in ``zscore``: infinite bounds). ``mask``: the foreground (spatial shape, channel-first or not),
        for ``zscore`` and ``robust``. Separate from :meth:`apply` so that part of a scan (a slice) can be
        normalised with the whole scan's statistics."""
        if self.mode == "none":  # already normalised by the preprocessing (radiographs: equalised onto [-1, 1])
            return -math.inf, math.inf, 0.0, 1.0
        if self.mode == "fingerprint":
            fp = self.fingerprint
            return (float(fp["percentile_00_5"]), float(fp["percentile_99_5"]), float(fp["mean"]),
                    max(float(fp["std"]), 1e-8))
        values = _tensor(img).float()
        spatial = values.shape[1:]
        fg = (
            _tensor(mask, device=values.device).bool().reshape(spatial)
            if mask is not None else torch.ones(spatial, dtype=torch.bool, device=values.device)
        )
        selected = values[:, fg] if bool(fg.any()) else values.reshape(values.shape[0], -1)
        low, high = -math.inf, math.inf
        if self.mode == "robust" and selected.numel():
            flat = selected.reshape(-1)  # order statistics of at most ~4M values (torch.quantile's limit: 2^24)
            sample = flat[:: max(1, math.ceil(flat.numel() / (1 << 22)))]
            low, high = (float(v) for v in torch.quantile(sample.double(), torch.tensor(
                [0.005, 0.995], dtype=torch.float64, device=sample.device)))
            selected = selected.clamp(low, high)
        std = float(selected.std()) if selected.numel() > 1 else 0.0
        # a relative guard: a scan given at any scale (even 1e-12) is standardised; only a constant one is not
        extent = float(selected.abs().max()) if selected.numel() else 0.0
        mean = float(selected.mean()) if selected.numel() else 0.0
        return low, high, mean, (std if std > 1e-6 * extent and std > 0 else 1.0)

    @staticmethod
    def apply(img: NdarrayOrTensor, parameters: Sequence[float]) -> NdarrayOrTensor:
        """``img`` normalised by :meth:`parameters` (of it, or of the scan it is part of); float32 of its type."""
        low, high, mean, scale = parameters
        values = _tensor(img).float()
        if math.isfinite(low) or math.isfinite(high):
            values = values.clamp(low, high)
        return convert_to_dst_type((values - mean) / scale, img, dtype=torch.float32)[0]

    def __call__(self, img: NdarrayOrTensor, mask: NdarrayOrTensor | None = None) -> NdarrayOrTensor:
        """``mask``: the foreground (spatial shape, channel-first or not), used by ``zscore`` and ``robust``."""
        return self.apply(img, self.parameters(img, mask))


class NormaliseIntensityd(MapTransform):
    """Dictionary wrapper of :class:`NormaliseIntensity`; ``zscore`` reads the mask from ``foreground_key``
    of the same dict (the whole image when that key is None or absent)."""

    backend = NormaliseIntensity.backend

    def __init__(
        self,
        keys: KeysCollection = "image",
        foreground_key: str | None = "foreground",
        mode: str = "zscore",
        fingerprint: Mapping | str | Path | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.foreground_key = foreground_key
        self.normaliser = NormaliseIntensity(mode, fingerprint)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        mask = d.get(self.foreground_key) if self.foreground_key is not None else None
        for key in self.key_iterator(d):
            d[key] = self.normaliser(d[key], mask=mask)
        return d


def _dicom_value(meta: Mapping, tag: str):
    """The first value of DICOM attribute ``tag`` (8 hex digits) in MONAI ``PydicomReader`` metadata, or None."""
    entry = meta.get(tag)
    value = entry.get("Value") if isinstance(entry, Mapping) else entry
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value


class RadiographIntensity(Transform):
    """The chest radiograph preprocessing of "Many tasks make light work" (Baugh et al., MICCAI 2023, section 3): one
    grey channel (the mean of a colour image's), the DICOM window where the file has one (WindowCenter and
    WindowWidth, DICOM PS3.3 C.11.2.1.2: clipped to center -/+ width / 2), MONOCHROME1 inverted (so that dense is
    bright, as in MONOCHROME2), then histogram equalisation (each value replaced by the fraction of pixels below
    it, over ``bins`` bins) onto [-1, 1]. Equalisation makes any monotone intensity mapping of an image (a
    detector's, a PNG export's gamma) give the same input. Returns (1, *spatial) float32 of the input's type."""

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, bins: int = 4096) -> None:
        self.bins = int(bins)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        meta = getattr(img, "meta", None) or {}
        values = _tensor(img).float().mean(dim=0, keepdim=True)
        center, width = _dicom_value(meta, "00281050"), _dicom_value(meta, "00281051")
        if center is not None and width is not None and float(width) > 0:
            values = values.clamp(float(center) - float(width) / 2, float(center) + float(width) / 2)
        if str(_dicom_value(meta, "00280004") or "").strip().upper() == "MONOCHROME1":
            values = values.max() + values.min() - values
        low, high = float(values.min()), float(values.max())
        if high > low:
            counts = torch.histc(values, bins=self.bins, min=low, max=high)
            cdf = counts.cumsum(0) / counts.sum()
            position = (values - low) / (high - low) * (self.bins - 1)  # linear between the bins' upper edges
            below = position.floor().long().clamp(0, self.bins - 1)
            above = (below + 1).clamp(max=self.bins - 1)
            weight = position - below
            values = ((1 - weight) * cdf[below] + weight * cdf[above]) * 2 - 1
        else:
            values = torch.zeros_like(values)
        return convert_to_dst_type(values, img, dtype=torch.float32)[0]


class RadiographIntensityd(MapTransform):
    """Dictionary wrapper of :class:`RadiographIntensity`."""

    backend = RadiographIntensity.backend

    def __init__(self, keys: KeysCollection = "image", bins: int = 4096, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = RadiographIntensity(bins)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class RandSyntheticAnomalyd(RandomizableTransform, MapTransform):
    """Add 1 to 4 synthetic anomalies of one randomly chosen task and write their soft label map
    (the self-supervised tasks of Baugh et al., "Many tasks make light work", MICCAI 2023).

    Args:
        keys: the image key (one key; stack modalities as channels).
        partner_key: another scan of the same dataset, same spatial shape (needed by ``fpi`` and
            ``poisson_intra``; those tasks are skipped for a sample without it).
        foreground_key: boolean foreground mask of the image (channel-first or not); if the key is
            absent the engine uses the voxels above the image's minimum.
        label_key: where the label map (1, *spatial) in [0, 1] is written.
        foreign_key: a scan of another dataset for ``poisson_inter``; None skips that task.
        tasks: names from ``scripts.anomalies.TASKS`` to choose from (default: all available).
        prob: probability that a sample gets anomalies at all (``RandomizableTransform``); otherwise its
            label is all zeros.
        task_key: where the chosen task's name (or ``"none"``) is written, for per-task validation.
        sigma, max_anomalies, continue_probability, min_overlap, interpolation_label: engine settings,
            see ``scripts.anomalies.synthesize``.
        allow_missing_keys: return the data unchanged when the image key is absent.

    Randomness comes only from ``self.R`` in ``randomize()`` (whether to apply, the task and a seed for the
    engine's ``torch.Generator``), so ``set_random_state(seed)`` reproduces the output bit for bit. Numpy,
    torch and MetaTensor inputs are accepted; the outputs have the input's type, and MetaTensor metadata is
    kept on both the image and the label.
    """

    backend = [TransformBackends.TORCH]

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
        RandomizableTransform.__init__(self, prob)
        self.tasks = tasks
        self.partner_key = partner_key
        self.foreground_key = foreground_key
        self.label_key = label_key
        self.foreign_key = foreign_key
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
        """Draw whether to apply (probability ``prob``), the task among ``data`` (default: all of
        ``self.tasks``) and the engine's seed, all from ``self.R``."""
        super().randomize(None)
        candidates = list(data) if data is not None else self.tasks
        self._task = candidates[self.R.randint(len(candidates))] if self._do_transform and candidates else NO_ANOMALY
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):  # one key; none when allow_missing_keys and the image is absent
            self._apply(d, key)
        return d

    def _apply(self, d: dict, key: Hashable) -> None:
        self.randomize(self._available_tasks(d))
        image = d[key]
        image_t = _tensor(image)
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
                foreground=self._foreground(d.get(self.foreground_key), image_t),
                partner=self._other(d.get(self.partner_key), image_t),
                foreign=self._other(d.get(self.foreign_key), image_t),
                **self.engine_kwargs,
            )
        d[key] = convert_to_dst_type(out, image, dtype=out.dtype)[0]
        d[self.label_key] = convert_to_dst_type(label, image, dtype=label.dtype)[0]
        if self.task_key is not None:
            d[self.task_key] = self._task

    @staticmethod
    def _other(value: NdarrayOrTensor | None, image: torch.Tensor) -> torch.Tensor | None:
        return None if value is None else _tensor(value, device=image.device)

    @staticmethod
    def _foreground(value: NdarrayOrTensor | None, image: torch.Tensor) -> torch.Tensor | None:
        if value is None:
            return None
        t = _tensor(value, device=image.device)
        spatial = tuple(image.shape[1:])
        if tuple(t.shape) != spatial:
            if t.ndim == len(spatial) + 1 and t.shape[0] == 1:
                t = t[0]
            else:
                raise ValueError(
                    f"foreground shape {tuple(t.shape)} does not match the image's spatial shape {spatial}"
                )
        return t.bool()


class TimedCompose(Compose):
    """A ``Compose`` of dictionary transforms that also records where the time goes: the seconds of each of its
    transforms (nested ``Compose`` flattened) are added to ``data[timings_key]``, a dict summed by stage.
    ``stages`` maps a transform's class name to its stage (e.g. ``{"LoadImaged": "load"}``); the others count as
    ``default_stage``. ``synchronize``: wait for the GPU after each transform, so that its work is counted where it
    was launched (only where the map is on the GPU: the writers copy it to the host anyway). The transforms run as
    ``Compose`` runs them, not lazily; ``start`` and ``end`` count the flattened transforms."""

    def __init__(self, transforms=None, stages: Mapping[str, str] | None = None, default_stage: str = "other",
                 timings_key: str = "timings", synchronize: bool = False, **kwargs) -> None:
        super().__init__(transforms, **kwargs)
        # flattened once: each flatten() makes a new Compose, which would re-seed random transforms on every call
        self._flat_transforms = self.flatten().transforms
        self.stages = dict(stages or {})
        self.default_stage = default_stage
        self.timings_key = timings_key
        self.synchronize = synchronize

    def __call__(self, data, start=0, end=None, threading=False, lazy=None):
        timings = {k: float(v) for k, v in (data.get(self.timings_key) or {}).items()}
        sync = self.synchronize and torch.cuda.is_available() and torch.cuda.is_initialized()
        for transform in self._flat_transforms[start:end]:
            began = time.perf_counter()
            data = apply_transform(transform, data, self.map_items, self.unpack_items, lazy=False,
                                   overrides=self.overrides, log_stats=self.log_stats)
            if sync:
                torch.cuda.synchronize()
            stage = self.stages.get(type(transform).__name__, self.default_stage)
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - began
        data = dict(data)
        data[self.timings_key] = timings
        return data
