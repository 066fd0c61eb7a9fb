"""Dataset discovery, data folds, the task/data-fold cross-validation of "Many tasks make light work",
and the datasets that pair scans and add synthetic anomalies for training and validation.

Cross-validation (Baugh et al., MICCAI 2023, arXiv:2307.13986, section 2 and Figure 1): five synthetic tasks are paired
with five data folds (task i with fold i). A model fold is one of ``combinations(range(5), T)`` for T
training tasks; it trains on its T tasks and validates on the other 5 - T. The data folds paired with the
training tasks form one group, those paired with the held-out tasks the other, and the LARGER group trains
while the smaller validates (with T = 1, four data folds train and one validates).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Randomizable

from scripts.anomalies import TASK_NEEDS
from scripts.io.files import is_scan
from scripts.networks import slices_with_foreground
from scripts.transforms import NormaliseIntensity, RandSyntheticAnomalyd


def list_scans(folder: str | Path, check_headers: bool = True) -> list[str]:
    """All ``*.nii.gz`` / ``*.nii`` files in ``folder``, sorted; a clear error for a missing, unreadable or
    empty folder, or (with ``check_headers``) for a file whose NIfTI header cannot be read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {str(folder)!r} does not exist or is not a folder")
    try:
        entries = list(folder.iterdir())
    except OSError as err:
        raise OSError(f"cannot read dataset folder {str(folder)!r}: {err}") from err
    scans = sorted(str(p) for p in entries if p.is_file() and is_scan(p))
    if not scans:
        raise ValueError(f"dataset folder {str(folder)!r} holds no *.nii.gz or *.nii scans")
    if check_headers:
        for scan in scans:
            try:
                header = nib.load(scan).header
            except Exception as err:  # nibabel raises several types for corrupt files
                raise ValueError(f"cannot read scan {scan!r}: {err}") from err
            if len(header.get_data_shape()) < 3:
                raise ValueError(f"scan {scan!r} is not a 3D volume: shape {header.get_data_shape()}")
    return scans


def compute_fingerprint(
    dataset: Sequence[dict], image_key: str = "image", foreground_key: str = "foreground",
    voxels_per_scan: int = 200_000, seed: int = 0,
) -> dict:
    """Intensity statistics of the foreground over a dataset, like nnU-Net's fingerprint.

    A fixed random subset of each scan's foreground voxels gives the 0.5 and 99.5 percentiles and the mean
    and standard deviation of the intensities clipped to them. Derived from the data, so it works for CT in
    Hounsfield units and for CT already rescaled to [0, 1] alike.
    """
    rng = np.random.RandomState(seed)
    samples = []
    for item in dataset:
        image = np.asarray(item[image_key], dtype=np.float32)
        foreground = np.asarray(item[foreground_key], dtype=bool).reshape(image.shape[-3:])
        values = image.reshape(-1, *foreground.shape)[:, foreground].ravel()
        values = values[np.isfinite(values)]
        if values.size > voxels_per_scan:
            values = values[rng.choice(values.size, voxels_per_scan, replace=False)]
        samples.append(values)
    values = np.concatenate(samples) if samples else np.zeros(0, dtype=np.float32)
    if values.size == 0:
        raise ValueError("cannot compute an intensity fingerprint: no foreground voxels in the dataset")
    low, high = np.percentile(values, [0.5, 99.5])
    clipped = np.clip(values, low, high)
    return {
        "percentile_00_5": float(low),
        "percentile_99_5": float(high),
        "mean": float(clipped.mean()),
        "std": float(clipped.std()),
        "num_scans": len(samples),
    }


def random_patch(label: torch.Tensor, foreground: torch.Tensor | None, patch_size: Sequence[int],
                 rng: np.random.RandomState, anomaly_probability: float = 0.5) -> tuple[slice, ...]:
    """The window of a training patch: around an anomalous voxel (``label > 0``) with ``anomaly_probability``,
    else around a foreground voxel, at a uniformly random place in the patch (clipped to the scan).

    Not centred on the chosen voxel, as MONAI's RandCropByPosNegLabeld and nnU-Net's sampling are: where an
    anomaly sits in the crop should tell the network nothing (centred crops would put every anomaly in the middle
    of its input; at a CPU budget the two scored alike, see the docs' recipe study).
    """
    spatial = tuple(label.shape[1:])
    if any(p > s for p, s in zip(patch_size, spatial)):
        raise ValueError(f"patch_size {list(patch_size)} is larger than the sample {list(spatial)}")
    pick_anomaly = rng.random_sample() < anomaly_probability
    candidates = (label[0] > 0) if pick_anomaly else None
    if candidates is None or not bool(candidates.any()):
        candidates = foreground.reshape(spatial).bool() if foreground is not None else None
    if candidates is not None and bool(candidates.any()):
        voxels = torch.nonzero(candidates)
        voxel = voxels[rng.randint(len(voxels))].tolist()
    else:
        voxel = [rng.randint(s) for s in spatial]
    starts = [min(max(v - rng.randint(p), 0), s - p) for v, p, s in zip(voxel, patch_size, spatial)]
    return tuple(slice(a, a + p) for a, p in zip(starts, patch_size))


class SyntheticAnomalyDataset(torch.utils.data.Dataset, Randomizable):
    """Preprocessed scans, each paired with a partner scan (and a foreign scan), with synthetic anomalies.

    Args:
        scans: the preprocessed scans of one split (e.g. a PersistentDataset): dicts with ``image`` and
            ``foreground``. Partners are drawn from the same sequence.
        tasks: the tasks to draw from.
        normalise: deterministic transform applied to every scan after the cache (intensity normalisation).
        foreign: preprocessed scans of another dataset for ``poisson_inter`` (normalised by
            ``foreign_normalise``), or None.
        anomaly_probability: probability that a sample gets anomalies at all.
        fixed: validation mode: item ``i`` is scan ``i // len(tasks)`` with task ``tasks[i % len(tasks)]``,
            and its partner, foreign scan, anomalies and whether it has any all follow from ``seed + i``,
            so the set is identical in every epoch and every run. Training mode: item ``i`` is scan ``i``
            with a partner, foreign scan and task drawn afresh from this dataset's random state.
        max_samples: validation mode: keep this many items (an evenly spaced subset), None for all.
        patch_size: return crops of this size instead of whole scans, cut after the anomalies are made (so they
            keep their size on the scan's grid) by :func:`random_patch`: half of them around an anomalous voxel.
            None: whole scans.
        slice_axis: training mode: return 2D slices along this spatial axis instead of volumes (the FPI system,
            :class:`scripts.networks.SliceWiseNetwork`): each item cuts one slice that holds foreground
            (:func:`scripts.networks.slices_with_foreground` with ``foreground_fraction``, the rule inference uses)
            from a scan, the same slice from its partner (and the corresponding one from the foreign scan), and
            makes the anomalies in 2D, as FPI does. None: volumes.
        slices_per_scan: slice mode: items per scan in an epoch (a slice is a small part of a scan).
        anomaly_kwargs: further arguments of ``RandSyntheticAnomalyd`` (sigma, max_anomalies, ...).
    """

    def __init__(
        self,
        scans: Sequence[dict],
        tasks: Sequence[str],
        normalise: Callable[[dict], dict] | None = None,
        foreign: Sequence[dict] | None = None,
        foreign_normalise: Callable[[dict], dict] | None = None,
        anomaly_probability: float = 1.0,
        fixed: bool = False,
        seed: int = 0,
        max_samples: int | None = None,
        patch_size: Sequence[int] | None = None,
        slice_axis: int | None = None,
        slices_per_scan: int = 1,
        foreground_fraction: float = 0.1,
        **anomaly_kwargs,
    ) -> None:
        if len(scans) == 0:
            raise ValueError("SyntheticAnomalyDataset needs at least one scan")
        tasks = [t for t in tasks if TASK_NEEDS[t] != "foreign" or foreign is not None]
        if not tasks:
            raise ValueError("no task left to apply (poisson_inter needs a foreign dataset)")
        self.scans = scans
        self.tasks = tasks
        self.normalise = normalise
        self.foreign = foreign
        self.foreign_normalise = foreign_normalise or normalise
        self.fixed = fixed
        self.seed = seed
        self.patch_size = [int(p) for p in patch_size] if patch_size else None
        if slice_axis is not None and (fixed or self.patch_size):
            raise ValueError("slice_axis is a training mode of whole slices: validation (fixed) scores volumes, and "
                             "slices take no patch_size")
        self.slice_axis = None if slice_axis is None else int(slice_axis)
        self.slices_per_scan = max(1, int(slices_per_scan)) if slice_axis is not None else 1
        self.foreground_fraction = foreground_fraction
        self._slice_cache: dict[tuple[int, int], tuple] = {}  # slice mode: per scan, (normalisation, slices)
        foreign_key = "foreign" if foreign is not None else None
        if fixed:
            self.anomaly = {
                t: RandSyntheticAnomalyd(tasks=[t], prob=anomaly_probability, foreign_key=foreign_key, **anomaly_kwargs)
                for t in tasks
            }
            total = len(scans) * len(tasks)
            count = total if max_samples is None else min(max_samples, total)
            self.indices = np.linspace(0, total - 1, count).round().astype(int).tolist() if count else []
        else:
            self.anomaly = RandSyntheticAnomalyd(
                tasks=tasks, prob=anomaly_probability, foreign_key=foreign_key, **anomaly_kwargs
            )

    def __len__(self) -> int:
        return len(self.indices) if self.fixed else len(self.scans) * self.slices_per_scan

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        if not self.fixed:  # the anomaly transform follows, with its own stream
            self.anomaly.set_random_state(seed=int(self.R.randint(2**31 - 1)))
        return self

    def randomize(self, data=None) -> None:
        pass  # draws happen in _item with the generator that fits the mode

    def _load(self, index: int, source: Sequence[dict], normalise) -> dict:
        # plain tensors: a PersistentDataset returns MetaTensors when it computes an item and plain tensors
        # when it reads it back from its cache, and a batch cannot mix the two
        item = {k: v.as_tensor() if isinstance(v, MetaTensor) else v for k, v in source[index].items()}
        return normalise(item) if normalise is not None else item

    def __getitem__(self, index: int) -> dict:
        if self.fixed:
            sample = self.indices[index]
            scan_index, task = divmod(sample, len(self.tasks))
            task = self.tasks[task]
            rng = np.random.RandomState((self.seed + sample) % (2**32))
            transform = self.anomaly[task]
            transform.set_random_state(seed=int(rng.randint(2**31 - 1)))
        else:
            scan_index, rng, transform = index // self.slices_per_scan, self.R, self.anomaly
        if self.slice_axis is not None:
            data = self._sliced_item(scan_index, rng)
        else:
            data = self._load(scan_index, self.scans, self.normalise)
            partner_index = self._other(scan_index, len(self.scans), rng)
            data["partner"] = self._load(partner_index, self.scans, self.normalise)["image"]
            if self.foreign is not None:
                data["foreign"] = self._load(rng.randint(len(self.foreign)), self.foreign,
                                             self.foreign_normalise)["image"]
        out = transform(data)
        for key in ("partner", "foreign"):
            out.pop(key, None)
        foreground = out.pop("foreground", None)
        if self.patch_size is not None:
            window = random_patch(out["label"], foreground, self.patch_size, rng)
            out.update({k: out[k][(slice(None), *window)] for k in ("image", "label")})
        return out

    def _scan_for_slices(self, index: int, source: Sequence[dict], normalise) -> tuple[dict, tuple, torch.Tensor]:
        """A scan as stored (before normalisation), its normalisation parameters and which of its slices hold
        foreground. The two are computed once per scan (and worker): every later slice of the scan is normalised
        alone with them, so a step costs its slices, not whole volumes."""

        item = {k: v.as_tensor() if isinstance(v, MetaTensor) else v for k, v in source[index].items()}
        key = (id(source), index)
        if key not in self._slice_cache:
            normaliser = getattr(normalise, "normaliser", None)
            if normaliser is None:  # no normalisation
                parameters = (-math.inf, math.inf, 0.0, 1.0)
            else:
                parameters = normaliser.parameters(item["image"], item.get(normalise.foreground_key))
            normalised = NormaliseIntensity.apply(item["image"], parameters)
            self._slice_cache[key] = parameters, slices_with_foreground(normalised, self.slice_axis,
                                                                          self.foreground_fraction)
        return (item, *self._slice_cache[key])

    def _sliced_item(self, scan_index: int, rng: np.random.RandomState) -> dict:
        """One slice of the scan that holds foreground, the same slice of a partner scan (and the foreign scan's
        slice at the same relative position), each normalised with its whole scan's statistics: (C, *2 spatial)."""
        dim = 1 + self.slice_axis  # after the channel
        item, parameters, keep = self._scan_for_slices(scan_index, self.scans, self.normalise)
        candidates = torch.nonzero(keep).flatten()
        index = int(candidates[rng.randint(len(candidates))]) if len(candidates) else rng.randint(len(keep))
        image = torch.as_tensor(item["image"])
        data = {"image": NormaliseIntensity.apply(image.select(dim, index), parameters)}
        if "foreground" in item:
            foreground = torch.as_tensor(item["foreground"])
            data["foreground"] = foreground.select(dim if foreground.ndim == image.ndim else dim - 1, index)
        partner, partner_parameters, _ = self._scan_for_slices(
            self._other(scan_index, len(self.scans), rng), self.scans, self.normalise)
        data["partner"] = NormaliseIntensity.apply(torch.as_tensor(partner["image"]).select(dim, index),
                                                   partner_parameters)
        if self.foreign is not None:
            foreign, foreign_parameters, _ = self._scan_for_slices(rng.randint(len(self.foreign)), self.foreign,
                                                                   self.foreign_normalise)
            volume = torch.as_tensor(foreign["image"])
            position = min(index * volume.shape[dim] // image.shape[dim], volume.shape[dim] - 1)
            data["foreign"] = NormaliseIntensity.apply(volume.select(dim, position), foreign_parameters)
        return data

    @staticmethod
    def _other(index: int, count: int, rng: np.random.RandomState) -> int:
        """A random index other than ``index`` (``index`` itself when it is the only one)."""
        if count == 1:
            return index
        other = rng.randint(count - 1)
        return other + 1 if other >= index else other


def fingerprint_for(dataset: Sequence[dict], normalisation: Mapping) -> dict | None:
    """The intensity fingerprint a plan's ``normalisation`` record uses: its own when it has one (a plan read from
    a models folder), else the training data's when its mode needs one (``fingerprint``), else None."""
    if normalisation.get("fingerprint") is not None:
        return dict(normalisation["fingerprint"])
    return compute_fingerprint(dataset) if normalisation["mode"] == "fingerprint" else None


def list_foreign_scans(folder: str | Path | None, count: int) -> list[str] | None:
    """The first ``count`` scans of another dataset for ``poisson_inter``; None without a folder (the task is off)."""
    return None if folder is None else list_scans(folder)[:count]
