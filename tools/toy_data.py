"""MOOD-layout toy data, generated offline (nothing is downloaded).

Writes, for each dataset (``brain``, ``abdom``), the folder layout of the MOOD challenge
(its evaluation code, github.com/MIC-DKFZ/mood)::

    <root>/<dataset>/<dataset>_train/00000.nii.gz ...        normal training scans
    <root>/<dataset>/toy/toy_<i>.nii.gz                      toy test scans (about half of them normal)
    <root>/<dataset>/toy_label/pixel/toy_<i>.nii.gz          uint8 masks: exactly the voxels an anomaly changed
    <root>/<dataset>/toy_label/sample/toy_<i>.nii.gz.txt     "0" or "1"
    <root>/<dataset>/toy_label/anomalies.json                per case: kinds ("normal" or anomaly kinds), boxes

Brain scans are T2-like (CSF bright, grey matter brighter than white matter), composed from the MNI152 tissue
maps nilearn ships (:func:`tools.phantoms.mni152_tissues`), each subject deformed by a smooth random elastic
field, with its own tissue contrast, gamma, bias field and Rician-like noise; float32 in [0, 1], zero
background, 256 / size mm isotropic voxels. Abdominal scans are :func:`tools.phantoms.ct_phantom` volumes
(int16 Hounsfield units, 384 / size mm voxels), generated at half size and repeated x2 above 256.

The toy anomalies are deliberately unlike the self-supervised training tasks (patch interpolation, Poisson
blending, sink/source deformation, smooth intensity change): lesion-like ``tumour``, ``infarct`` and ``spots``,
and artificial ``foreign_object``, ``noise_patch`` and ``missing_slab``. The pixel label of a case is
``anomalous != normal``, so it holds exactly the voxels that changed. ``n_gorilla`` adds plainly abnormal
``gorilla_<i>`` cases (a cube of uniform noise, a constant bright cube, an upside-down block;
:data:`GORILLA_KINDS`), each on a subject of its own, for ``bench/bench_quality.py``.

Phantom subjects differ far less than a real cohort (a voxel-wise z-score against the training normals, with no
registration, finds the toy anomalies far better than it would on real scans), so ``variability="cohort"`` gives
every subject, training normals and test cases alike, what differs between real subjects (:func:`cohort_variation`):
a rotation of a few degrees, a scale within 7 %, a shift, a smooth non-rigid warp of a few millimetres, a bias field
(MR) or per-tissue contrast changes (CT); the anomalies are made on the varied subject. ``phantom`` (the default) is
the phantoms as they are.

CLI: ``PYTHONPATH=bundle:. python -m tools.toy_data --output_dir DIR [--datasets brain abdom] [--size N]
[--train N] [--toy N] [--seed S] [--variability phantom|cohort]``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from scripts.io.files import MOOD_DATASETS
from tools.phantoms import _smooth_field, ct_phantom, mni152_tissues

__all__ = [
    "ANOMALY_KINDS", "COHORT", "DEFAULT_SIZE", "GORILLA_KINDS", "VARIABILITIES", "apply_anomaly", "brain_scan",
    "abdom_scan", "cohort_variation", "gorilla_case", "normal_scan", "toy_case",
    "write_toy_dataset", "main",
]

DATASETS = MOOD_DATASETS
DEFAULT_SIZE = {"brain": 256, "abdom": 512}
# field of view in mm: 1 mm voxels at 256 (brain); 0.75 mm at 512, 3 mm at 128 (abdomen, as phantoms.py)
FOV_MM = {"brain": 256.0, "abdom": 384.0}
# subject seeds: toy and gorilla subjects never coincide with training subjects
TRAIN_OFFSET, TOY_OFFSET, GORILLA_OFFSET = 0, 50_000, 80_000

# Intensities per dataset: brain in [0, 1] (T2-like), abdomen in Hounsfield units.
PROFILE = {
    "brain": {"background": 0.0, "min": 0.0, "max": 1.0, "core": (0.8, 0.95), "necrosis": (0.1, 0.25),
              "edema": 0.12, "infarct": (0.35, 0.6), "tissue": 0.08, "spot": (0.9, 1.0), "foreign": (0.4, 1.0),
              "noise": "uniform"},
    "abdom": {"background": -1000.0, "min": -1000.0, "max": 3000.0, "core": (90.0, 130.0),
              "necrosis": (-5.0, 15.0), "edema": -20.0, "infarct": (-60.0, -35.0), "tissue": (-40.0, 200.0),
              "spot": (300.0, 700.0), "foreign": (2000.0, 3000.0), "noise": (40.0, 350.0)},
}


def _spacing(dataset: str, size: int) -> float:
    return FOV_MM[dataset] / size


def _affine(dataset: str, size: int) -> np.ndarray:
    s = _spacing(dataset, size)
    return np.diag([s, s, s, 1.0])


# --------------------------------------------------------------------------------------------- normal scans
def brain_scan(size: int, subject: int, return_tissues: bool = False):
    """A T2-like brain of one subject: ``(volume, brain_mask)`` (and the subject's deformed tissue maps
    ``{"gm", "wm", "csf"}`` when ``return_tissues``). Deterministic in ``subject``."""
    maps = mni152_tissues(size)
    rng = np.random.default_rng([int(subject), 2])
    shape = (size,) * 3
    # a smooth random elastic deformation (RMS 2 % of the side), as phantoms.brain_partner
    coords = np.indices(shape, dtype=np.float32)
    for axis in range(3):
        coords[axis] += 0.02 * size * _smooth_field(rng, shape)
    warped = {k: ndi.map_coordinates(maps[k].astype(np.float32), coords, order=1, mode="constant")
              for k in ("gm", "wm", "csf", "brain")}
    del coords
    brain = ndi.binary_fill_holes(warped.pop("brain") > 0.5)
    # per-subject tissue contrast (T2: CSF > GM > WM), gamma, bias field and Rician-like noise
    c_csf, c_gm, c_wm = 1.0, rng.uniform(0.5, 0.6), rng.uniform(0.3, 0.4)
    vol = c_csf * warped["csf"] + c_gm * warped["gm"] + c_wm * warped["wm"]
    vol = np.clip(vol, 0.0, None) ** float(np.exp(rng.uniform(-0.15, 0.15)))
    vol *= np.exp(0.08 * _smooth_field(rng, shape, waves=4, max_cycles=1.0))
    sigma = rng.uniform(0.015, 0.03)
    n1 = rng.standard_normal(shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(shape, dtype=np.float32) * sigma
    vol = np.sqrt((vol + n1) ** 2 + n2**2)
    del n1, n2
    vol[~brain] = 0.0
    top = float(np.percentile(vol[brain], 99.9)) if brain.any() else 1.0
    vol = np.clip(vol / max(top, 1e-6), 0.0, 1.0).astype(np.float32)
    if return_tissues:
        return vol, brain, warped
    return vol, brain


def abdom_scan(size: int, subject: int) -> tuple[np.ndarray, np.ndarray]:
    """A CT phantom of one subject in int16 HU and its body mask; above 256 it is generated at half size
    (rounded up) and repeated x2 along every axis."""
    vol, body = ct_phantom(_ct_base_size(size), seed=int(subject))
    return _repeated_to(np.round(vol).astype(np.int16), body, size)


def _ct_base_size(size: int) -> int:
    """The side a CT phantom of ``size`` is generated at: itself up to 256, else half of it (rounded up)."""
    return size if size <= 256 else (size + 1) // 2


def _repeated_to(volume: np.ndarray, body: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A volume generated at :func:`_ct_base_size` and its mask, repeated x2 along every axis to ``size``."""
    if volume.shape[0] == size:
        return volume, body
    crop = (slice(0, size),) * 3
    return (volume.repeat(2, 0).repeat(2, 1).repeat(2, 2)[crop], body.repeat(2, 0).repeat(2, 1).repeat(2, 2)[crop])


# how subjects differ (:func:`normal_scan`): ``phantom``, the phantoms as they are; ``cohort``, as in a real cohort
VARIABILITIES = ("phantom", "cohort")
# the spread of a cohort between subjects, each drawn uniformly within +-: rotation about each axis (degrees),
# isotropic scale, shift (mm); a smooth non-rigid warp (RMS displacement per axis, mm); MR: a multiplicative bias
# field (RMS of its log); CT: per-tissue HU offsets (fat, soft tissue: e.g. contrast phase), a bone scale and a
# smooth additive field (HU, e.g. beam hardening)
COHORT = {"rotation_deg": 4.0, "scale": 0.07, "shift_mm": 6.0, "warp_mm": 3.0, "mr_bias": 0.12,
          "ct_fat_hu": 20.0, "ct_soft_hu": 20.0, "ct_bone_scale": 0.1, "ct_field_hu": 8.0}


def _similarity_warp(shape: tuple[int, ...], spacing: float, rng: np.random.Generator) -> np.ndarray:
    """Where each output voxel takes its value from (``map_coordinates``' coordinates, voxels): a random rotation,
    scale and shift about the volume's centre (the :data:`COHORT` ranges), plus a smooth non-rigid displacement."""
    angles = np.deg2rad(rng.uniform(-COHORT["rotation_deg"], COHORT["rotation_deg"], 3))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        a, b = [i for i in range(3) if i != axis]
        turn = np.eye(3)
        turn[a, a] = turn[b, b] = np.cos(angle)
        turn[a, b], turn[b, a] = -np.sin(angle), np.sin(angle)
        rotation = turn @ rotation
    scale = 1.0 + rng.uniform(-COHORT["scale"], COHORT["scale"])
    shift = rng.uniform(-COHORT["shift_mm"], COHORT["shift_mm"], 3) / spacing
    inverse = rotation.T / scale  # output -> source: the inverse of x' = scale R (x - c) + c + shift
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2.0
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1)
    offset = centre - inverse @ (centre + shift)
    coords = (inverse.astype(np.float32) @ grid + offset[:, None].astype(np.float32)).reshape(3, *shape)
    del grid
    for axis in range(3):
        coords[axis] += (COHORT["warp_mm"] / spacing) * _smooth_field(rng, shape, waves=4, max_cycles=1.5)
    return coords


def cohort_variation(volume: np.ndarray, foreground: np.ndarray, dataset: str, spacing: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One subject as a real cohort would vary it (:data:`COHORT`): moved, scaled and warped (linear
    interpolation; the foreground by nearest neighbour), then its intensities: a bias field for MR (the brain in
    [0, 1], renormalised to its 99.9th foreground percentile as :func:`brain_scan`), per-tissue HU changes for CT
    (a monotone piecewise-linear map through fat, soft tissue and bone, and a smooth additive field)."""
    background = float(PROFILE[dataset]["background"])
    coords = _similarity_warp(volume.shape, spacing, rng)
    moved = ndi.map_coordinates(volume.astype(np.float32), coords, order=1, mode="constant", cval=background)
    inside = ndi.map_coordinates(foreground.astype(np.uint8), coords, order=0, mode="constant", cval=0) > 0
    del coords
    field = _smooth_field(rng, volume.shape, waves=4, max_cycles=1.0)
    if dataset == "brain":
        moved *= np.exp(COHORT["mr_bias"] * field)
        moved[~inside] = 0.0
        top = float(np.percentile(moved[inside], 99.9)) if inside.any() else 1.0
        return np.clip(moved / max(top, 1e-6), 0.0, 1.0).astype(np.float32), inside
    # CT: HU knots air, fat, water, soft tissue, bone, the phantom's top; air and water stay where they are
    fat, soft = rng.uniform(-1, 1) * COHORT["ct_fat_hu"], rng.uniform(-1, 1) * COHORT["ct_soft_hu"]
    bone = 1.0 + rng.uniform(-1, 1) * COHORT["ct_bone_scale"]
    knots = np.array([-1000.0, -100.0, 0.0, 60.0, 400.0, 1500.0])
    mapped = np.array([-1000.0, -100.0 + fat, 0.0, 60.0 + soft, 400.0 * bone, 1500.0 * bone])
    moved = np.interp(moved, knots, mapped).astype(np.float32)
    moved[inside] += COHORT["ct_field_hu"] * field[inside]
    moved[~inside] = background
    return np.clip(moved, PROFILE[dataset]["min"], 1500.0 * bone).astype(np.float32), inside


def normal_scan(dataset: str, size: int, subject: int, variability: str = "phantom") -> tuple[np.ndarray, np.ndarray]:
    """``(volume, foreground)`` of one normal subject of ``dataset``; ``variability`` ``cohort``: varied as a real
    cohort's subjects are (:func:`cohort_variation`, deterministic in ``subject``)."""
    if variability not in VARIABILITIES:
        raise ValueError(f"variability must be one of {VARIABILITIES}, got {variability!r}")
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be 'brain' or 'abdom', got {dataset!r}")
    if variability == "phantom":
        return brain_scan(size, subject) if dataset == "brain" else abdom_scan(size, subject)
    rng = np.random.default_rng([int(subject), 23])
    if dataset == "brain":
        return cohort_variation(*brain_scan(size, subject), dataset, _spacing(dataset, size), rng)
    base = _ct_base_size(size)  # as abdom_scan: varied at the generated size, then repeated
    volume, body = cohort_variation(*abdom_scan(base, subject), dataset, _spacing(dataset, base), rng)
    return _repeated_to(np.round(volume).astype(np.int16), body, size)


# ------------------------------------------------------------------------------------------------ helpers
def _box(centre, reach, shape) -> tuple[slice, ...]:
    return tuple(slice(max(int(np.floor(c - r)), 0), min(int(np.ceil(c + r)) + 1, n))
                 for c, r, n in zip(centre, reach, shape))


def _pick_centre(foreground: np.ndarray, rng: np.random.Generator, reach: float, tries: int = 40) -> tuple:
    """A random foreground voxel whose surrounding box (half-side ``reach``) is as much foreground as possible
    (sampled within the foreground's bounding box, without listing all foreground voxels)."""
    ranges = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(foreground.any(axis=other))
        ranges.append((int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, foreground.shape[axis]))
    best, best_frac = None, -1.0
    for _ in range(tries):
        c = tuple(int(rng.integers(lo, hi)) for lo, hi in ranges)
        if not foreground[c]:
            continue
        frac = float(foreground[_box(c, (reach,) * 3, foreground.shape)].mean())
        if frac > best_frac:
            best, best_frac = c, frac
        if frac > 0.97:
            break
    if best is None:  # fall back to the foreground's centre of mass
        best = tuple(int(round(v)) for v in ndi.center_of_mass(foreground))
    return best


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _radius_field(box, centre, radii, rng, roughness: float = 0.0) -> np.ndarray:
    """Normalised radius of a randomly rotated ellipsoid over ``box`` (< 1 inside), its boundary perturbed
    by smooth noise of relative amplitude ``roughness``."""
    offsets = np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) - c for s, c in zip(box, centre)],
                          indexing="ij", sparse=True)
    rot = _rotation(rng).astype(np.float32)
    r2 = np.zeros(tuple(s.stop - s.start for s in box), dtype=np.float32)
    for i in range(3):
        proj = rot[i, 0] * offsets[0] + rot[i, 1] * offsets[1] + rot[i, 2] * offsets[2]
        r2 = r2 + (proj / radii[i]) ** 2
    radius = np.sqrt(r2)
    if roughness > 0:
        noise = ndi.gaussian_filter(rng.standard_normal(radius.shape).astype(np.float32),
                                    sigma=max(min(radii) / 3.0, 0.7))
        noise /= noise.std() + 1e-6
        radius *= 1.0 + roughness * np.clip(noise, -2.5, 2.5)
    return radius


def _uniform(rng, bounds) -> float:
    return float(rng.uniform(*bounds))


def _write(vol: np.ndarray, box, region: np.ndarray, values, profile) -> None:
    """Set ``vol[box][region] = values`` (clipped to the profile's range, rounded for integer volumes)."""
    values = np.clip(values, profile["min"], profile["max"])
    if np.issubdtype(vol.dtype, np.integer):
        values = np.round(values)
    sub = vol[box]  # a view: basic slicing
    sub[region] = values if np.ndim(values) == 0 else values[region]


# ---------------------------------------------------------------------------------------- anomaly kinds
def tumour(vol, fg, rng, profile):
    """An irregular blob (boundary perturbed by smooth noise) with a hyperintense core, a hypointense
    necrotic centre and a faint edema rim, inside the foreground."""
    n = min(vol.shape)
    r = rng.uniform(0.05, 0.11) * n
    radii = r * rng.uniform(0.75, 1.25, size=3)
    centre = _pick_centre(fg, rng, r)
    box = _box(centre, (1.6 * max(radii) + 2,) * 3, vol.shape)
    d = _radius_field(box, centre, radii, rng, roughness=0.2)
    inside = fg[box]
    base = vol[box].astype(np.float32)
    texture = ndi.gaussian_filter(rng.standard_normal(d.shape).astype(np.float32), 1.0)
    texture /= texture.std() + 1e-6
    core_v, nec_v = _uniform(rng, profile["core"]), _uniform(rng, profile["necrosis"])
    spread = 0.03 * (profile["max"] - profile["min"]) if profile["noise"] == "uniform" else 8.0
    out = base.copy()
    rim = (d >= 1.0) & (d < 1.45) & inside
    out[rim] = base[rim] + profile["edema"]
    core = (d < 1.0) & inside
    out[core] = core_v + spread * texture[core]
    necrotic = (d < rng.uniform(0.35, 0.55)) & inside
    out[necrotic] = nec_v + 0.5 * spread * texture[necrotic]
    _write(vol, box, rim | core, out, profile)
    return box


def infarct(vol, fg, rng, profile):
    """A hypointense irregular region that follows the tissue: its texture is kept but darkened (brain:
    intensity x 0.35-0.6; abdomen: -35 to -60 HU in soft tissue only), with a soft boundary."""
    n = min(vol.shape)
    r = rng.uniform(0.06, 0.13) * n
    radii = r * rng.uniform(0.6, 1.4, size=3)
    centre = _pick_centre(fg, rng, r)
    box = _box(centre, (1.3 * max(radii) + 2,) * 3, vol.shape)
    d = _radius_field(box, centre, radii, rng, roughness=0.3)
    weight = np.clip((1.0 - d) / 0.25, 0.0, 1.0)  # soft edge over the outer quarter of the radius
    base = vol[box].astype(np.float32)
    tissue = profile["tissue"]
    if isinstance(tissue, tuple):
        region = fg[box] & (base > tissue[0]) & (base < tissue[1]) & (weight > 0)
        out = base + weight * _uniform(rng, profile["infarct"])
    else:
        region = fg[box] & (base > tissue) & (weight > 0)
        out = base * (1.0 - weight * (1.0 - _uniform(rng, profile["infarct"])))
    _write(vol, box, region, out, profile)
    return box


def spots(vol, fg, rng, profile):
    """A small cluster of 4 to 12 bright spots (radius 1 to ~1.5 % of the side) inside the foreground."""
    n = min(vol.shape)
    cluster = max(0.05 * n, 3.0)
    centre = _pick_centre(fg, rng, cluster)
    rmax = max(1.0, 0.015 * n)
    box = _box(centre, (cluster + rmax + 1,) * 3, vol.shape)
    grids = np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) for s in box], indexing="ij", sparse=True)
    region = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
    values = np.zeros(region.shape, dtype=np.float32)
    for _ in range(int(rng.integers(4, 13))):
        c = np.asarray(centre) + rng.uniform(-cluster, cluster, size=3)
        rad = rng.uniform(0.8, rmax)
        blob = sum((g - ci) ** 2 for g, ci in zip(grids, c)) <= rad**2
        blob |= sum((g - round(ci)) ** 2 for g, ci in zip(grids, c)) == 0  # at least the nearest voxel
        values[blob] = _uniform(rng, profile["spot"])
        region |= blob
    region &= fg[box]
    _write(vol, box, region, values, profile)
    return box


def foreign_object(vol, fg, rng, profile):
    """A sharp-edged uniform sphere or (rotated) cube of an unusual intensity (brain: one flat value in
    [0.4, 1] without texture or noise; abdomen: metal, 2000-3000 HU), inside the foreground."""
    n = min(vol.shape)
    r = max(rng.uniform(0.025, 0.06) * n, 1.5)
    centre = _pick_centre(fg, rng, r)
    box = _box(centre, (1.8 * r + 1,) * 3, vol.shape)
    offsets = np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) - c for s, c in zip(box, centre)],
                          indexing="ij", sparse=True)
    if rng.uniform() < 0.5:
        region = sum(o**2 for o in offsets) <= r**2
    else:
        rot = _rotation(rng)
        region = np.ones(tuple(s.stop - s.start for s in box), dtype=bool)
        for i in range(3):
            region &= np.abs(sum(rot[i, j] * offsets[j] for j in range(3))) <= r
    region = region & fg[box]
    _write(vol, box, region, _uniform(rng, profile["foreign"]), profile)
    return box


def noise_patch(vol, fg, rng, profile):
    """A box (inside the foreground) replaced by strong random noise (brain: uniform in [0, 1]; abdomen:
    Gaussian, 40 +- 350 HU)."""
    n = min(vol.shape)
    half = rng.uniform(0.04, 0.1, size=3) * n
    centre = _pick_centre(fg, rng, float(half.max()))
    box = _box(centre, np.maximum(half, 1.0), vol.shape)
    shape = tuple(s.stop - s.start for s in box)
    if profile["noise"] == "uniform":
        values = rng.uniform(profile["min"], profile["max"], size=shape).astype(np.float32)
    else:
        mean, sd = profile["noise"]
        values = (mean + sd * rng.standard_normal(shape)).astype(np.float32)
    _write(vol, box, fg[box], values, profile)
    return box


def missing_slab(vol, fg, rng, profile):
    """Signal dropout: a slab (3-8 % of the side thick, along a random axis, through the foreground) set to
    the background value."""
    axis = int(rng.integers(0, 3))
    other = tuple(a for a in range(3) if a != axis)
    idx = np.flatnonzero(fg.any(axis=other))
    if idx.size == 0:
        return (slice(0, 0),) * 3
    span = idx[-1] - idx[0] + 1
    thick = max(int(round(rng.uniform(0.03, 0.08) * vol.shape[axis])), 1)
    start = int(idx[0] + rng.uniform(0.2, 0.8) * span - thick / 2)
    start = min(max(start, 0), vol.shape[axis] - thick)
    box = [slice(0, s) for s in vol.shape]
    box[axis] = slice(start, start + thick)
    box = tuple(box)
    _write(vol, box, fg[box], profile["background"], profile)
    return box


ANOMALY_KINDS: dict[str, Callable] = {
    "tumour": tumour, "infarct": infarct, "spots": spots,
    "foreign_object": foreign_object, "noise_patch": noise_patch, "missing_slab": missing_slab,
}


# ------------------------------------------------------------- the "gorilla" set: plainly abnormal cubes
def _gorilla_box(vol, fg, rng, side: float) -> tuple[slice, ...]:
    """A cube of ``side`` x the volume's side, centred on the foreground voxel whose cube is most foreground."""
    half = max(side * min(vol.shape) / 2, 1.0)
    return _box(_pick_centre(fg, rng, half), (half,) * 3, vol.shape)


def _foreground_range(vol, fg) -> tuple[float, float]:
    values = vol[fg] if fg.any() else vol.reshape(-1)
    return float(np.percentile(values, 0.5)), float(np.percentile(values, 99.5))


def noise_cube(vol, fg, rng, profile):
    """A cube (10 % of the side) of uniform noise over the scan's own foreground range."""
    box = _gorilla_box(vol, fg, rng, 0.1)
    low, high = _foreground_range(vol, fg)
    _write(vol, box, np.ones(vol[box].shape, bool), rng.uniform(low, high, vol[box].shape), profile)
    return box


def bright_cube(vol, fg, rng, profile):
    """A cube (10 % of the side) of one constant, the scan's 99.5th foreground percentile."""
    box = _gorilla_box(vol, fg, rng, 0.1)
    _write(vol, box, np.ones(vol[box].shape, bool), _foreground_range(vol, fg)[1], profile)
    return box


def mirrored_block(vol, fg, rng, profile):
    """A block (15 % of the side) turned upside down: its content mirrored along the last (head-foot) axis."""
    box = _gorilla_box(vol, fg, rng, 0.15)
    vol[box] = vol[box][..., ::-1].copy()
    return box


GORILLA_KINDS: dict[str, Callable] = {
    "noise_cube": noise_cube, "bright_cube": bright_cube, "mirrored_block": mirrored_block,
}


def apply_anomaly(kind: str, volume: np.ndarray, foreground: np.ndarray, rng: np.random.Generator,
                  dataset: str) -> tuple[np.ndarray, dict]:
    """A copy of ``volume`` with one anomaly of ``kind``, and ``{"kind", "bbox"}`` (the bounding box
    ``[[lo, hi), ...]`` of the voxels it changed, or None when nothing changed)."""
    kinds = {**ANOMALY_KINDS, **GORILLA_KINDS}
    if kind not in kinds:
        raise ValueError(f"unknown anomaly kind {kind!r}; expected one of {sorted(kinds)}")
    out = volume.copy()
    box = kinds[kind](out, foreground, rng, PROFILE[dataset])
    changed = out[box] != volume[box]
    bbox = None
    if changed.any():
        bbox = []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            idx = np.flatnonzero(changed.any(axis=other))
            bbox.append([int(box[axis].start + idx[0]), int(box[axis].start + idx[-1] + 1)])
    return out, {"kind": kind, "bbox": bbox}


# ------------------------------------------------------------------------------------------------ toy cases
def _case_plan(index: int, seed: int) -> tuple[bool, list[str]]:
    """Whether toy case ``index`` is anomalous and its kinds: in each pair of cases (2k, 2k+1) exactly one is
    anomalous; the primary kind cycles through all kinds; a quarter of the anomalous cases get a second kind."""
    pair = index // 2
    rng = np.random.default_rng([int(seed), pair, 11])
    anomalous = (index % 2) == int(rng.integers(0, 2))
    kinds = list(ANOMALY_KINDS)
    offset = int(np.random.default_rng([int(seed), 12]).integers(0, len(kinds)))
    chosen = [kinds[(pair + offset) % len(kinds)]]
    if rng.uniform() < 0.25:
        chosen.append(kinds[int(rng.choice([i for i in range(len(kinds)) if kinds[i] != chosen[0]]))])
    return anomalous, (chosen if anomalous else [])


def _case(dataset: str, size: int, subject: int, kinds: list[str], rng: np.random.Generator,
          variability: str = "phantom"):
    """``(normal, anomalous, mask, info)`` of one subject with anomalies of ``kinds`` (none: a normal case)."""
    normal, fg = normal_scan(dataset, size, subject, variability)
    anomalous, anomalies = normal, []
    for kind in kinds:
        for _ in range(5):  # retry in the (rare) case that an anomaly changed nothing
            candidate, entry = apply_anomaly(kind, anomalous, fg, rng, dataset)
            if entry["bbox"] is not None:
                anomalous = candidate
                anomalies.append(entry)
                break
    mask = (anomalous != normal).astype(np.uint8)
    bbox = None
    if mask.any():
        bbox = []
        for axis in range(3):
            idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
            bbox.append([int(idx[0]), int(idx[-1] + 1)])
    label = int(bbox is not None)
    info = {"label": label, "kinds": [a["kind"] for a in anomalies] if label else ["normal"], "bbox": bbox,
            "anomalies": anomalies}
    return normal, anomalous, mask, info


def toy_case(dataset: str, index: int, size: int, seed: int = 0, variability: str = "phantom"):
    """Toy case ``index``: ``(normal, anomalous, mask, info)``; ``mask`` is uint8 ``anomalous != normal``,
    ``info`` holds ``label`` (0/1), ``kinds`` (["normal"] or anomaly kinds), ``bbox`` (of the mask, or None)
    and ``anomalies`` (each kind's changed-voxel box). Deterministic in ``(dataset, index, size, seed)``."""
    anomalous_flag, kinds = _case_plan(index, seed)
    rng = np.random.default_rng([int(seed), int(index), 13])
    normal, anomalous, mask, info = _case(dataset, size, seed * 100_003 + TOY_OFFSET + index, kinds, rng,
                                          variability)
    return normal, anomalous, mask, {**info, "planned": anomalous_flag}


def gorilla_case(dataset: str, index: int, size: int, seed: int = 0, variability: str = "phantom"):
    """Gorilla case ``index`` (as :func:`toy_case`): a subject of its own with one plainly abnormal cube, the
    kinds of :data:`GORILLA_KINDS` in turn."""
    kind = list(GORILLA_KINDS)[index % len(GORILLA_KINDS)]
    rng = np.random.default_rng([int(seed), int(index), 17])
    return _case(dataset, size, seed * 100_003 + GORILLA_OFFSET + index, [kind], rng, variability)


def write_toy_dataset(root: str | Path, dataset: str, n_train: int = 20, n_toy: int = 10, size: int | None = None,
                      seed: int = 0, n_gorilla: int = 0, variability: str = "phantom") -> dict:
    """Write one dataset in the MOOD layout under ``root/<dataset>``; returns a summary dict with the folders,
    file lists and the per-case anomaly info (also written to ``toy_label/anomalies.json``). ``n_gorilla``
    adds that many ``gorilla_<i>.nii.gz`` cases (:func:`gorilla_case`) to the toy folder; ``variability``
    (:data:`VARIABILITIES`) is how the subjects differ."""
    import nibabel as nib

    if dataset not in DATASETS:
        raise ValueError(f"dataset must be 'brain' or 'abdom', got {dataset!r}")
    size = int(size or DEFAULT_SIZE[dataset])
    base = Path(root) / dataset
    train_dir, toy_dir = base / f"{dataset}_train", base / "toy"
    pixel_dir, sample_dir = base / "toy_label" / "pixel", base / "toy_label" / "sample"
    for d in (train_dir, toy_dir, pixel_dir, sample_dir):
        d.mkdir(parents=True, exist_ok=True)
    affine = _affine(dataset, size)
    train = []
    for i in range(n_train):
        vol, _ = normal_scan(dataset, size, seed * 100_003 + TRAIN_OFFSET + i, variability)
        path = train_dir / f"{i:05d}.nii.gz"
        nib.save(nib.Nifti1Image(vol, affine), path)
        train.append(str(path))
    cases = {}
    planned = [(f"toy_{i}.nii.gz", toy_case, i) for i in range(n_toy)]
    planned += [(f"gorilla_{i}.nii.gz", gorilla_case, i) for i in range(n_gorilla)]
    for name, make_case, i in planned:
        _, anomalous, mask, info = make_case(dataset, i, size, seed, variability)
        nib.save(nib.Nifti1Image(anomalous, affine), toy_dir / name)
        nib.save(nib.Nifti1Image(mask, affine), pixel_dir / name)
        (sample_dir / f"{name}.txt").write_text(f"{info['label']}\n")
        info.pop("planned", None)
        cases[name] = info
        del anomalous, mask
    meta = {"dataset": dataset, "size": size, "seed": seed, "variability": variability,
            "spacing_mm": _spacing(dataset, size),
            "kinds": list(ANOMALY_KINDS) + (list(GORILLA_KINDS) if n_gorilla else []), "cases": cases}
    (base / "toy_label" / "anomalies.json").write_text(json.dumps(meta, indent=1))
    return {"root": str(base), "train": train, "toy": sorted(str(toy_dir / n) for n in cases), "cases": cases}


def main(argv: list[str] | None = None) -> dict:
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Write MOOD-layout toy data (normal training scans and toy "
                                                 "test cases with labels); nothing is downloaded.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--size", type=int, default=None, help="cube side (default: 256 brain, 512 abdomen)")
    parser.add_argument("--train", type=int, default=20, help="normal training scans per dataset")
    parser.add_argument("--toy", type=int, default=10, help="toy test cases per dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variability", choices=VARIABILITIES, default="phantom",
                        help="cohort: subjects moved, scaled, warped and with their own contrast, as in a real cohort")
    args = parser.parse_args(argv)
    out = {}
    for dataset in args.datasets:
        start = time.perf_counter()
        out[dataset] = write_toy_dataset(args.output_dir, dataset, args.train, args.toy, args.size, args.seed,
                                         variability=args.variability)
        n_anom = sum(c["label"] for c in out[dataset]["cases"].values())
        print(f"{dataset}: {args.train} training scans, {args.toy} toy cases ({n_anom} anomalous) in "
              f"{out[dataset]['root']} ({time.perf_counter() - start:.1f} s)")
    return out


if __name__ == "__main__":
    main()
