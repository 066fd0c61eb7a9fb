"""The feature bank of the voxel classifier: about twenty numbers per voxel of a preprocessed, normalised scan on its
working grid, in four groups that the plan names (and a study leaves out one at a time):

- ``texture``: the intensity at several Gaussian scales, differences of Gaussians (band-pass), the Laplacian and
  the gradient magnitude, the Hessian's eigenvalues (blob and sheet shapes), the local standard deviation at two
  scales and the local entropy of the intensity histogram;
- ``normative``: z-scores of the smoothed intensity and of the local standard deviation against their voxel-wise
  mean and standard deviation over the training normals (:class:`NormativeStatistics`), on a common grid after
  aligning every scan's foreground box; their absolute values enter the trees under a monotone constraint (the
  further from the normals, the more anomalous), so that a deviation larger than any training sample showed still
  scores high;
- ``mirror``: the difference between a voxel and its left-right mirror about the foreground box's centre (axis 0
  of the RAS working grid), at two scales: for anatomy that is symmetric;
- ``position``: the voxel's place in the foreground box (three coordinates in [0, 1]) and its distance to the
  foreground's edge.

Computed with scipy.ndimage on float32 volumes: its separable Gaussian filters are 3 to 6 times faster on this
CPU than torch's 3D convolutions with the same kernels (one thread, 256^3), and the Euclidean distance transform is
there too; two filters run at once in threads (scipy releases the GIL). The bank is deterministic: no random draw.
Its ``version`` goes into the plan, so a model is never fed features it was not trained on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

__all__ = ["FEATURE_BANK_VERSION", "FEATURE_GROUPS", "FeatureBank", "NormativeStatistics", "box_of",
           "feature_settings", "foreground_box", "scored_voxels"]

FEATURE_BANK_VERSION = 1
FEATURE_GROUPS = ("texture", "normative", "mirror", "position")

# ``foreground_fraction``: the classifier's own foreground (voxels above min + fraction (p99 - min) of the
# normalised scan); lower than the preprocessing's 10 % so that CT fat and MR CSF count. ``std_floor``: added to the
# normals' standard deviation (in normalised units) so that a z-score never divides by almost nothing.
# ``score_margin``: the voxels scored are the foreground grown by this many voxels, its enclosed holes filled (about
# half of the box on a brain: half the prediction time); None scores the whole foreground box (plans recorded
# before the setting existed).
DEFAULTS = {"version": FEATURE_BANK_VERSION, "groups": list(FEATURE_GROUPS), "scales": [1.0, 2.0, 4.0],
            "normative_grid": [64, 64, 64], "foreground_fraction": 0.01, "entropy_bins": 8, "std_floor": 0.1,
            "box_margin": 4, "score_margin": 4}


def feature_settings(groups: Sequence[str] | None = None, **overrides) -> dict:
    """The plan's record of the feature bank: :data:`DEFAULTS` with ``groups`` (a subset of
    :data:`FEATURE_GROUPS`) and ``overrides``."""
    settings = {**DEFAULTS, **overrides}
    settings["groups"] = [g for g in FEATURE_GROUPS if g in (groups if groups is not None else FEATURE_GROUPS)]
    unknown = sorted(set(groups or ()) - set(FEATURE_GROUPS))
    if unknown or not settings["groups"]:
        raise ValueError(f"feature groups must be a non-empty subset of {FEATURE_GROUPS}, got {groups}")
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown feature settings {unknown}; the bank takes {sorted(DEFAULTS)}")
    if len(settings["scales"]) != 3:
        raise ValueError(f"scales must be three Gaussian sigmas (fine, middle, coarse), got {settings['scales']}")
    settings["scales"] = [float(s) for s in settings["scales"]]
    settings["normative_grid"] = [int(s) for s in settings["normative_grid"]]
    return settings


def foreground_of(image: np.ndarray, fraction: float) -> np.ndarray:
    """Voxels above ``min + fraction * (p99 - min)`` (:class:`scripts.transforms.IntensityForeground`'s rule)."""
    step = max(1, int(round((image.size / 2**21) ** (1 / 3))))  # p99 of a strided subset: exact enough, fast
    values = image[::step, ::step, ::step]
    low, high = float(values.min()), float(np.percentile(values, 99))
    mask = image > low + fraction * (high - low)
    return mask if mask.any() else np.ones_like(mask)


def box_of(foreground: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """The bounding box of ``foreground``, grown by ``margin`` voxels within the grid."""
    box = []
    for axis in range(foreground.ndim):
        hit = np.flatnonzero(foreground.any(axis=tuple(a for a in range(foreground.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, foreground.shape[axis])))
    return tuple(box)


def foreground_box(image: np.ndarray, settings: Mapping) -> tuple[np.ndarray, tuple[slice, ...]]:
    """The foreground of ``image`` and its box grown by ``box_margin`` (the alignment of the normative grid)."""
    foreground = foreground_of(image, settings["foreground_fraction"])
    return foreground, box_of(foreground, int(settings["box_margin"]))


def scored_voxels(image: np.ndarray, settings: Mapping) -> tuple[np.ndarray, tuple[slice, ...]]:
    """The voxels the classifier scores as flat indices (outside them the map is 0), and the foreground box: the
    foreground grown by ``score_margin`` voxels with its enclosed holes filled (so that a hole cut into the
    anatomy, or one opening to its surface narrower than twice the margin, counts), or the whole box where
    ``score_margin`` is None."""
    foreground, box = foreground_box(image, settings)
    inside = np.zeros(image.shape, bool)
    margin = settings.get("score_margin")
    if margin is None:
        inside[box] = True
    else:
        grown = ndi.binary_dilation(foreground[box], iterations=int(margin)) if margin else foreground[box]
        inside[box] = ndi.binary_fill_holes(grown)
    return np.flatnonzero(inside), box


def _resized(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``volume`` resampled to ``shape`` (trilinear, torch: multi-threaded)."""
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(tensor, size=tuple(int(s) for s in shape), mode="trilinear",
                                           align_corners=True)[0, 0].numpy()


class NormativeStatistics:
    """Voxel-wise mean and standard deviation of the training normals' intensity, smoothed at the bank's middle scale,
    and of their local standard deviation at that scale, on a common grid: each scan's foreground box resampled to
    ``grid`` (the alignment: the box; recorded in the plan). Stored as a compact ``.npz`` of four float16 arrays,
    read without unpickling and checked against its SHA-256."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, texture_mean: np.ndarray, texture_std: np.ndarray) -> None:
        self.mean = np.asarray(mean, np.float32)  # of the intensity smoothed at the middle scale
        self.std = np.asarray(std, np.float32)
        self.texture_mean = np.asarray(texture_mean, np.float32)  # of the local standard deviation there
        self.texture_std = np.asarray(texture_std, np.float32)

    @classmethod
    def from_scans(cls, images: Sequence[np.ndarray], settings: Mapping) -> NormativeStatistics:
        grid = settings["normative_grid"]
        total = np.zeros((2, *grid), np.float64)
        squares = np.zeros((2, *grid), np.float64)
        for image in images:
            _, box = foreground_box(image, settings)
            smooth, local_std = _smooth_and_local_std(np.asarray(image, np.float32), settings["scales"][1])
            aligned = np.stack([_resized(v[box], grid) for v in (smooth, local_std)]).astype(np.float64)
            total += aligned
            squares += aligned**2
        count = max(len(images), 1)
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
        return cls(mean[0], std[0], mean[1], std[1])

    def in_box(self, shape: Sequence[int]) -> tuple[np.ndarray, ...]:
        """The four statistics resampled onto a foreground box of ``shape``."""
        return tuple(_resized(v, shape) for v in (self.mean, self.std, self.texture_mean, self.texture_std))

    def save(self, path: str | Path) -> str:
        """Write the file (float16) and return its SHA-256."""
        from scripts.io.files import write_atomically

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **{k: getattr(self, k).astype(np.float16) for k in _STATISTICS})

        write_atomically(path, write)
        return sha256_of(path)

    @classmethod
    def load(cls, path: str | Path, sha256: str | None) -> NormativeStatistics:
        """Read ``path`` if its SHA-256 is ``sha256`` (never unpickled: ``allow_pickle=False``)."""
        check_sha256(path, sha256)
        with np.load(path, allow_pickle=False) as data:
            missing = sorted(set(_STATISTICS) - set(data.files))
            if missing:
                raise ValueError(f"{str(path)!r} lacks the statistics {missing}")
            return cls(*(data[k] for k in _STATISTICS))


_STATISTICS = ("mean", "std", "texture_mean", "texture_std")


def _smooth_and_local_std(image: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """The image smoothed at ``sigma`` and its local standard deviation there."""
    smooth = ndi.gaussian_filter(image, sigma, mode="nearest", truncate=3.0)
    second = ndi.gaussian_filter(image * image, sigma, mode="nearest", truncate=3.0)
    return smooth, np.sqrt(np.maximum(second - smooth * smooth, 0.0))


def sha256_of(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_sha256(path: str | Path, expected: str | None) -> None:
    """A clear error when ``path`` is not the file the plan recorded (changed, replaced, or not recorded)."""
    if expected is None:
        raise ValueError(f"{str(path)!r} is not recorded in its folder's plan (no SHA-256): it is refused; train "
                         "the classifier through 'make train' / 'python -m scripts.training'")
    actual = sha256_of(path)
    if actual != expected:
        raise ValueError(f"{str(path)!r} is refused: its SHA-256 {actual[:12]}... is not the {expected[:12]}... its "
                         "plan recorded (the file was changed or replaced after training)")


def _eigenvalues(hxx, hyy, hzz, hxy, hxz, hyz) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The eigenvalues of symmetric 3x3 matrices, sorted (closed form, Smith 1961), float32 arrays in, out."""
    q = (hxx + hyy + hzz) / 3
    p1 = hxy**2 + hxz**2 + hyz**2
    a, b, c = hxx - q, hyy - q, hzz - q
    p = np.sqrt(np.maximum((a * a + b * b + c * c + 2 * p1) / 6, 1e-12))
    det = (a * (b * c - hyz * hyz) - hxy * (hxy * c - hyz * hxz) + hxz * (hxy * hyz - b * hxz)) / (2 * p**3)
    phi = np.arccos(np.clip(det, -1, 1)) / 3
    high = q + 2 * p * np.cos(phi)
    low = q + 2 * p * np.cos(phi + 2 * np.pi / 3)
    return low, 3 * q - high - low, high


class FeatureBank:
    """The features of one scan, as rows of the voxels it scores.

        bank = FeatureBank(settings)                  # the plan's record (feature_settings)
        names = bank.names()
        shared = bank.shared(image)                   # every group but normative; computed once per scan
        rows = bank.rows(shared, normative)           # (voxels, features) float32, normative per fold
    """

    def __init__(self, settings: Mapping) -> None:
        settings = {"score_margin": None, **settings}  # a plan recorded before the setting scored its whole box
        self.settings = feature_settings(settings["groups"], **{k: v for k, v in settings.items() if k != "groups"})
        if self.settings["version"] != FEATURE_BANK_VERSION:
            raise ValueError(f"the plan's feature bank is version {self.settings['version']}; this bundle computes "
                             f"version {FEATURE_BANK_VERSION}: retrain the classifier")
        self.groups = self.settings["groups"]

    def names(self) -> list[str]:
        fine, middle, coarse = (f"{s:g}" for s in self.settings["scales"])
        names = []
        if "texture" in self.groups:
            names += ["intensity", f"gauss_{fine}", f"gauss_{middle}", f"gauss_{coarse}", f"dog_{fine}_{middle}",
                      f"dog_{middle}_{coarse}", f"laplacian_{fine}", f"gradient_{fine}", f"hessian_{middle}_low",
                      f"hessian_{middle}_mid", f"hessian_{middle}_high", f"std_{middle}", f"std_{coarse}",
                      f"entropy_{middle}"]
        if "normative" in self.groups:
            names += [f"z_{fine}", f"z_{middle}", f"abs_z_{middle}", f"z_std_{middle}", f"abs_z_std_{middle}"]
        if "mirror" in self.groups:
            names += [f"mirror_{fine}", f"mirror_{coarse}"]
        if "position" in self.groups:
            names += ["box_0", "box_1", "box_2", "edge_distance"]
        return names

    def monotone(self) -> list[int]:
        """LightGBM's monotone constraints, in :meth:`names` order: the map never falls as a voxel's distance from
        the normals (the absolute z-scores) grows."""
        return [1 if name.startswith("abs_z") else 0 for name in self.names()]

    def shared(self, image: np.ndarray | torch.Tensor, voxels: np.ndarray | None = None) -> dict:
        """Everything but the normative features of ``image`` (spatial, or (1, *spatial)) at ``voxels`` (flat
        indices; default :func:`scored_voxels`), with what the normative features need."""
        image = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, np.float32)
        image = image[0] if image.ndim == 4 else image
        settings = self.settings
        if voxels is None:
            voxels, box = scored_voxels(image, settings)
        else:  # the caller chose them (training's sampled rows): only the box is needed
            voxels, box = np.asarray(voxels), foreground_box(image, settings)[1]
        fine, middle, coarse = settings["scales"]
        columns: dict[str, np.ndarray] = {}

        def at(volume: np.ndarray) -> np.ndarray:
            return volume.reshape(-1)[voxels].astype(np.float32, copy=False)

        def gauss(volume, sigma):
            return ndi.gaussian_filter(volume, sigma, mode="nearest", truncate=3.0)

        with ThreadPoolExecutor(max_workers=2) as pool:
            smooth = dict(zip((fine, middle, coarse), pool.map(lambda s: gauss(image, s), (fine, middle, coarse))))
        need_texture = "texture" in self.groups
        if need_texture:
            squared = image * image
            with ThreadPoolExecutor(max_workers=2) as pool:
                second = dict(zip((middle, coarse), pool.map(lambda s: gauss(squared, s), (middle, coarse))))
            del squared
            columns["intensity"] = at(image)
            for sigma in (fine, middle, coarse):
                columns[f"gauss_{sigma:g}"] = at(smooth[sigma])
            columns[f"dog_{fine:g}_{middle:g}"] = columns[f"gauss_{fine:g}"] - columns[f"gauss_{middle:g}"]
            columns[f"dog_{middle:g}_{coarse:g}"] = columns[f"gauss_{middle:g}"] - columns[f"gauss_{coarse:g}"]
            gradients = np.gradient(smooth[fine])
            columns[f"gradient_{fine:g}"] = at(np.sqrt(sum(g * g for g in gradients)))
            columns[f"laplacian_{fine:g}"] = at(sum(np.gradient(g, axis=a) for a, g in enumerate(gradients)))
            del gradients
            first = np.gradient(smooth[middle])
            hessian = [at(np.gradient(first[i], axis=j)) for i, j in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))]
            del first
            for name, values in zip(("low", "mid", "high"), _eigenvalues(*hessian)):
                columns[f"hessian_{middle:g}_{name}"] = values.astype(np.float32)
            for sigma in (middle, coarse):
                variance = at(second[sigma]) - at(smooth[sigma]) ** 2
                columns[f"std_{sigma:g}"] = np.sqrt(np.maximum(variance, 0.0))
            columns[f"entropy_{middle:g}"] = at(self._entropy(image, middle))
        if "mirror" in self.groups:
            for sigma in (fine, coarse):
                mirrored = np.zeros_like(image)
                mirrored[box] = smooth[sigma][box] - smooth[sigma][box][::-1]
                columns[f"mirror_{sigma:g}"] = at(mirrored)
        if "position" in self.groups:
            coordinates = np.unravel_index(voxels, image.shape)
            for axis, (c, b) in enumerate(zip(coordinates, box)):
                columns[f"box_{axis}"] = np.clip((c - b.start) / max(b.stop - b.start - 1, 1), 0, 1).astype(np.float32)
            columns["edge_distance"] = at(self._edge_distance(image))
        shared = {"columns": columns, "voxels": voxels, "box": box, "shape": image.shape}
        if "normative" in self.groups:
            local_std = (np.sqrt(np.maximum(second[middle] - smooth[middle] ** 2, 0.0)) if need_texture
                         else _smooth_and_local_std(image, middle)[1])
            shared["smooth"] = {s: smooth[s][box] for s in (fine, middle)}
            shared["local_std"] = local_std[box]
        return shared

    def rows(self, shared: Mapping, normative: NormativeStatistics | None = None) -> np.ndarray:
        """The feature matrix (voxels, features), float32, in :meth:`names` order; ``normative``: the statistics
        of this fold's normals (needed when the bank has the normative group)."""
        columns = dict(shared["columns"])
        if "normative" in self.groups:
            if normative is None:
                raise ValueError("the feature bank has normative features: pass the normals' statistics")
            box, shape, voxels = shared["box"], shared["shape"], shared["voxels"]
            box_shape = tuple(b.stop - b.start for b in box)
            mean, std, texture_mean, texture_std = normative.in_box(box_shape)
            floor = self.settings["std_floor"]
            fine, middle, _ = self.settings["scales"]

            def z_at(values: np.ndarray, centre: np.ndarray, spread: np.ndarray) -> np.ndarray:
                z = np.zeros(shape, np.float32)
                z[box] = (values - centre) / (spread + floor)
                return z.reshape(-1)[voxels]

            for sigma in (fine, middle):
                columns[f"z_{sigma:g}"] = z_at(shared["smooth"][sigma], mean, std)
            columns[f"abs_z_{middle:g}"] = np.abs(columns[f"z_{middle:g}"])
            columns[f"z_std_{middle:g}"] = z_at(shared["local_std"], texture_mean, texture_std)
            columns[f"abs_z_std_{middle:g}"] = np.abs(columns[f"z_std_{middle:g}"])
        names = self.names()
        matrix = np.empty((len(shared["voxels"]), len(names)), np.float32)
        for i, name in enumerate(names):
            matrix[:, i] = columns[name]
        return matrix

    def _entropy(self, image: np.ndarray, sigma: float) -> np.ndarray:
        """Local entropy of the intensity histogram (``entropy_bins`` bins between the foreground's 1st and 99th
        percentiles), each bin's share a Gaussian-weighted count: computed at half resolution (8 blurs)."""
        bins = int(self.settings["entropy_bins"])
        half = image[::2, ::2, ::2]
        foreground = foreground_of(half, self.settings["foreground_fraction"])
        low, high = np.percentile(half[foreground], [1, 99])
        index = np.clip(((half - low) / max(high - low, 1e-6) * bins).astype(np.int64), 0, bins - 1)

        def share(b):
            p = ndi.gaussian_filter((index == b).astype(np.float32), sigma / 2, mode="nearest", truncate=3.0)
            return -p * np.log(np.maximum(p, 1e-6))

        with ThreadPoolExecutor(max_workers=2) as pool:
            entropy = sum(pool.map(share, range(bins)))
        return _resized(entropy, image.shape)

    def _edge_distance(self, image: np.ndarray) -> np.ndarray:
        """The distance (voxels) of each voxel to the foreground's edge, positive inside and negative outside;
        computed at half resolution."""
        foreground = foreground_of(image[::2, ::2, ::2], self.settings["foreground_fraction"])
        distance = ndi.distance_transform_edt(foreground) - ndi.distance_transform_edt(~foreground)
        return _resized(2.0 * distance.astype(np.float32), image.shape)
