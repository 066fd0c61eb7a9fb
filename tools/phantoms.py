"""Offline, deterministic volumes for previews, benchmarks and toy data.

- :func:`mni152_brain`: the MNI152 (ICBM 2009a, nonlinear symmetric) T1 template that nilearn ships inside
  its wheel, resampled to a cube and z-scored over the brain.
- :func:`brain_partner`: a plausible "other subject" made from a brain volume by a smooth random elastic
  deformation and a mild contrast and bias-field change.
- :func:`ct_phantom`: a procedural abdominal CT-like volume in Hounsfield units.

All volumes use the same axis convention as the template (RAS voxel order): axis 0 runs from the subject's
left to right, axis 1 from posterior to anterior, axis 2 from inferior to superior. Nothing here touches
the network: the template is read straight from nilearn's package data with nibabel, without importing
``nilearn.datasets`` (whose fetchers are the only part of nilearn that downloads).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "MNI152_T1_FILE", "brain_partner", "ct_phantom", "mni152_brain", "mni152_path", "mni152_tissues",
    "write_normal_scans", "zscore",
]

# The file nilearn's ``load_mni152_template`` reads (``nilearn.datasets.struct.MNI152_FILE_PATH``).
MNI152_T1_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"

# Hounsfield units of the phantom's tissues.
HU = {
    "air": -1000.0,
    "fat": -100.0,
    "muscle": 50.0,
    "liver": 60.0,
    "spleen": 50.0,
    "kidney_cortex": 40.0,
    "kidney_medulla": 30.0,
    "blood": 40.0,
    "bowel_wall": 35.0,
    "bowel_content": 15.0,
    "csf": 10.0,
    "disc": 80.0,
    "cancellous": 350.0,
    "cortical": 900.0,
}


def mni152_path() -> Path:
    """Path of the MNI152 T1 template inside the installed nilearn package (no import of nilearn itself)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("nilearn is not installed; it ships the MNI152 template")
    path = Path(spec.origin).parent / "datasets" / "data" / MNI152_T1_FILE
    if not path.is_file():
        raise FileNotFoundError(f"nilearn's MNI152 template is missing: {path}")
    return path


@functools.lru_cache(maxsize=4)
def _mni152_cached(size: int) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    raw = np.asarray(nib.load(mni152_path()).dataobj, dtype=np.float32)
    raw /= raw.max()
    # crop to the brain (plus a small margin), then pad to a cube so that zooming keeps the anatomy's aspect
    nonzero = np.nonzero(raw > 0)
    margin = 4
    lo = [max(int(a.min()) - margin, 0) for a in nonzero]
    hi = [min(int(a.max()) + 1 + margin, n) for a, n in zip(nonzero, raw.shape, strict=True)]
    raw = raw[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
    side = max(raw.shape)
    pad = [((side - n) // 2, side - n - (side - n) // 2) for n in raw.shape]
    cube = np.pad(raw, pad)
    factor = size / side
    if factor < 1.0:  # anti-aliasing before downsampling
        cube = ndi.gaussian_filter(cube, sigma=(1.0 / factor - 1.0) / 2.0, truncate=3.0)
    vol = ndi.zoom(cube, factor, order=1, grid_mode=True, mode="grid-constant", cval=0.0)
    vol = _fit(vol, size)
    foreground = _largest_component(ndi.binary_fill_holes(vol > 0.1))
    values = vol[foreground]
    z = (vol - values.mean()) / values.std()
    # everything outside the brain mask becomes one constant, the minimum of the volume
    z[~foreground] = min(float(z[foreground].min()), float(z.min()))
    return z.astype(np.float32), foreground


def _fit(vol: np.ndarray, size: int) -> np.ndarray:
    """Crop or zero-pad (centred) to ``(size,) * 3``: ``ndi.zoom`` may be off by one voxel."""
    out = np.zeros((size,) * 3, dtype=vol.dtype)
    src, dst = [], []
    for n in vol.shape:
        take = min(n, size)
        s0, d0 = (n - take) // 2, (size - take) // 2
        src.append(slice(s0, s0 + take))
        dst.append(slice(d0, d0 + take))
    out[tuple(dst)] = vol[tuple(src)]
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndi.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def zscore(volume: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """``volume`` standardised with the mean and standard deviation of its foreground, as float32."""
    values = volume[foreground]
    return ((volume - values.mean()) / (values.std() + 1e-12)).astype(np.float32)


def mni152_brain(size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """The MNI152 T1 template as a ``(size, size, size)`` float32 cube and its brain mask.

    The template nilearn ships is skull-stripped, so the foreground is the **brain** mask (template above
    10 % of its maximum, holes filled, largest component; it includes the ventricles), not the head. The
    brain's bounding box (plus 4 voxels) is padded to a cube before resampling, so the anatomy keeps its
    aspect. Intensities are z-scored over the foreground; the background is one constant, the volume's
    minimum. Axis order: left to right, posterior to anterior, inferior to superior.

    Works offline: it reads the NIfTI file inside nilearn's package directory with nibabel.
    """
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    vol, fg = _mni152_cached(int(size))
    return vol.copy(), fg.copy()


# Grey- and white-matter probability maps nilearn ships next to the T1 template (same grid).
MNI152_GM_FILE = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
MNI152_WM_FILE = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"


@functools.lru_cache(maxsize=2)
def _mni152_tissues_cached(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import nibabel as nib

    folder = mni152_path().parent
    t1 = np.asarray(nib.load(folder / MNI152_T1_FILE).dataobj, dtype=np.float32)
    # the same crop (T1 bounding box plus 4 voxels), cube padding and zoom as _mni152_cached
    nonzero = np.nonzero(t1 > 0)
    margin = 4
    lo = [max(int(a.min()) - margin, 0) for a in nonzero]
    hi = [min(int(a.max()) + 1 + margin, n) for a, n in zip(nonzero, t1.shape, strict=True)]
    crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    side = max(b - a for a, b in zip(lo, hi, strict=True))
    factor = size / side
    out = []
    for name in (MNI152_GM_FILE, MNI152_WM_FILE):
        raw = np.asarray(nib.load(folder / name).dataobj, dtype=np.float32)[crop]
        raw /= max(float(raw.max()), 1e-6)
        pad = [((side - n) // 2, side - n - (side - n) // 2) for n in raw.shape]
        cube = np.pad(raw, pad)
        if factor < 1.0:
            cube = ndi.gaussian_filter(cube, sigma=(1.0 / factor - 1.0) / 2.0, truncate=3.0)
        vol = ndi.zoom(cube, factor, order=1, grid_mode=True, mode="grid-constant", cval=0.0)
        out.append(np.clip(_fit(vol, size), 0.0, 1.0).astype(np.float32))
    _, brain = _mni152_cached(size)
    gm, wm = out[0] * brain, out[1] * brain
    total = gm + wm
    scale = np.where(total > 1.0, 1.0 / np.maximum(total, 1e-6), 1.0).astype(np.float32)
    gm, wm = gm * scale, wm * scale
    csf = np.clip(brain.astype(np.float32) - gm - wm, 0.0, 1.0)
    return gm, wm, csf, brain


def mni152_tissues(size: int = 128) -> dict[str, np.ndarray]:
    """Grey matter, white matter and CSF probability maps on the grid of :func:`mni152_brain` (same crop,
    cube and zoom), plus its brain mask: ``{"gm", "wm", "csf", "brain"}``. The maps are nilearn's ICBM 2009a
    GM/WM maps (scaled to [0, 1], zero outside the brain mask, GM + WM <= 1); CSF is the brain mask minus GM
    minus WM, clipped to [0, 1]. Offline: read with nibabel from nilearn's package data."""
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    gm, wm, csf, brain = _mni152_tissues_cached(int(size))
    return {"gm": gm.copy(), "wm": wm.copy(), "csf": csf.copy(), "brain": brain.copy()}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], waves: int = 6,
                  max_cycles: float = 2.0) -> np.ndarray:
    """A smooth random field with zero mean and unit standard deviation (about): a sum of ``waves`` random
    plane waves with 0.5 to ``max_cycles`` cycles across the volume, each evaluated as an outer product of
    1D complex exponentials."""
    field = np.zeros(shape, dtype=np.float32)
    axes = [np.arange(n, dtype=np.float32) / n for n in shape]
    for _ in range(waves):
        direction = rng.normal(size=len(shape))
        direction /= np.linalg.norm(direction) + 1e-12
        k = 2.0 * np.pi * rng.uniform(0.5, max_cycles) * direction
        phase = rng.uniform(0.0, 2.0 * np.pi)
        wave = np.exp(1j * phase).astype(np.complex64)
        parts = [np.exp(1j * k[i] * axes[i]).astype(np.complex64) for i in range(len(shape))]
        prod = parts[0][:, None, None] * parts[1][None, :, None] * parts[2][None, None, :]
        field += (wave * prod).imag * rng.uniform(0.5, 1.0)
    return (field - field.mean()) / (field.std() + 1e-12)


def brain_partner(volume: np.ndarray, foreground: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A plausible other subject: a smooth random elastic deformation (per-axis displacements with an RMS of
    2 % of the volume's side, 2.6 voxels at 128^3, at most about three times that; 0.5 to 2 cycles across
    the volume), a mild gamma-contrast change (gamma in [0.86, 1.16]) and a smooth multiplicative bias field
    (RMS 8 %).

    Returns a volume z-scored over its (deformed) foreground with a constant minimum background, like
    :func:`mni152_brain`. Deterministic in ``seed``.
    """
    volume = np.asarray(volume, dtype=np.float32)
    foreground = np.asarray(foreground, dtype=bool)
    rng = np.random.default_rng([int(seed), 152])
    shape = volume.shape
    amplitude = 0.02 * min(shape)
    coords = np.indices(shape, dtype=np.float32)
    for axis in range(volume.ndim):
        coords[axis] += amplitude * _smooth_field(rng, shape)
    low = float(volume.min())
    warped = ndi.map_coordinates(volume, coords, order=1, mode="constant", cval=low)
    warped_fg = ndi.map_coordinates(foreground.astype(np.float32), coords, order=1, mode="constant") > 0.5
    warped_fg = ndi.binary_fill_holes(warped_fg)
    del coords
    # contrast and bias on a [0, 1] version of the intensities
    span = float(warped.max()) - low
    unit = (warped - low) / (span if span > 0 else 1.0)
    gamma = float(np.exp(rng.uniform(-0.15, 0.15)))
    bias = np.exp(0.08 * _smooth_field(rng, shape, waves=4, max_cycles=1.0))
    unit = (unit**gamma) * bias
    values = unit[warped_fg]
    out = (unit - values.mean()) / (values.std() + 1e-12)
    if warped_fg.any():
        out[~warped_fg] = min(float(out[warped_fg].min()), float(out.min()))
    return out.astype(np.float32), warped_fg


def _ellipsoid(grid: tuple[np.ndarray, ...], centre, radii, rotation: float = 0.0) -> np.ndarray:
    """Normalised squared radius ``sum((x - c)^2 / r^2)`` (< 1 inside), optionally rotated in the axial
    plane."""
    x, y, z = (g - c for g, c in zip(grid, centre, strict=True))
    if rotation:
        cos, sin = np.cos(rotation), np.sin(rotation)
        x, y = cos * x - sin * y, sin * x + cos * y
    return (x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2


def _paint(vol: np.ndarray, grid, centre, radii, value: float, rotation: float = 0.0,
           within: np.ndarray | None = None) -> tuple[tuple[slice, ...], np.ndarray]:
    """Set ``vol`` to ``value`` inside an ellipsoid (restricted to ``within``), evaluating it only on its
    bounding box. Returns the box (slices) and the painted mask over it."""
    n = vol.shape
    reach = max(radii[0], radii[1]) if rotation else None
    box = []
    for axis in range(3):
        r = reach if (reach is not None and axis < 2) else radii[axis]
        lo = max(int(np.floor(centre[axis] - r)) - 1, 0)
        hi = min(int(np.ceil(centre[axis] + r)) + 2, n[axis])
        box.append(slice(lo, max(hi, lo)))
    box = tuple(box)
    # grid entries are open (broadcastable) arrays: slice each along its own axis only
    sub = (grid[0][box[0], :, :], grid[1][:, box[1], :], grid[2][:, :, box[2]])
    inside = _ellipsoid(sub, centre, radii, rotation) < 1.0
    if within is not None:
        inside &= within[box]
    vol[box][inside] = value
    return box, inside


def ct_phantom(size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A procedural abdominal CT-like volume in Hounsfield units and its body mask (the foreground).

    ``(size, size, size)`` float32, axes left-right, posterior-anterior, inferior-superior. Air (-1000 HU)
    around an elliptical body: subcutaneous fat (-100), the muscle wall (50), visceral fat, liver (60),
    spleen (50), kidneys (cortex 40, medulla 30), aorta and inferior vena cava (40), psoas muscles, the spine
    (vertebral bodies of cancellous bone ~350 with a cortical shell ~900, posterior elements, discs ~80 and
    the spinal canal ~10), bowel loops with gas pockets (-1000), and mild noise inside the body (sigma 12).
    Sizes and positions jitter with ``seed``. Values are clipped to [-1000, 1500].
    """
    if size < 16:
        raise ValueError(f"size must be at least 16, got {size}")
    rng = np.random.default_rng([int(seed), 7])
    n = int(size)
    s = n / 128.0  # organ sizes are designed at 128^3

    def jit(scale: float = 1.0) -> float:
        return float(rng.uniform(-1.0, 1.0)) * scale * s

    ax = np.arange(n, dtype=np.float32)
    grid = (ax[:, None, None], ax[None, :, None], ax[None, None, :])
    cx, cy = (n - 1) / 2.0 + jit(2), (n - 1) / 2.0 + jit(2)
    vol = np.full((n, n, n), HU["air"], dtype=np.float32)

    # body: an elliptical cylinder that tapers slightly along z
    bx, by = (0.43 + 0.03 * rng.uniform(-1, 1)) * n, (0.31 + 0.03 * rng.uniform(-1, 1)) * n
    zc = (ax - (n - 1) / 2.0) / n
    taper = (1.0 - 0.06 * zc + 0.04 * rng.uniform(-1, 1) * zc**2)[None, None, :]
    xn = (grid[0] - cx) / bx
    yn = (grid[1] - cy) / by
    r2 = (xn**2 + yn**2) / taper**2  # normalised squared radius of the body outline
    body = r2 < 1.0
    fat_thickness = 0.07 + 0.02 * rng.uniform(-1, 1)  # relative to the body's semi-axes
    muscle_thickness = 0.07
    inner_fat = (1.0 - fat_thickness) ** 2
    inner_muscle = (1.0 - fat_thickness - muscle_thickness) ** 2
    vol[body] = HU["fat"]
    wall = r2 < inner_fat
    vol[wall] = HU["muscle"]
    cavity = r2 < inner_muscle
    vol[cavity] = HU["fat"] + 20.0  # visceral fat, a little denser than subcutaneous

    # spine: vertebral body centre at about 0.4 of the body's depth from the back
    sx, sy = cx + jit(1), cy - 0.1 * n + jit(1)
    vb_r = 0.058 * n * (1 + 0.05 * rng.uniform(-1, 1))
    canal_y = sy - 1.45 * vb_r
    zmid = (n - 1) / 2.0
    # paraspinal muscles behind the spine, psoas muscles beside the vertebral bodies (growing caudally)
    for side in (-1, 1):
        _paint(vol, grid, (sx + side * 1.7 * vb_r, canal_y - 0.5 * vb_r, zmid),
               (1.4 * vb_r, 1.5 * vb_r, 2.0 * n), HU["muscle"], within=wall)
        _paint(vol, grid, (sx + side * 1.6 * vb_r, sy + 0.2 * vb_r, 0.2 * n),
               (0.8 * vb_r, 0.75 * vb_r, 0.75 * n), HU["muscle"], within=cavity)
    # vertebral bodies along z with discs in between
    period = 0.2 * n * (1 + 0.05 * rng.uniform(-1, 1))
    zpos = ((ax + rng.uniform(0, period)) % period)[None, None, :]
    disc_z = zpos < 0.22 * period
    d2 = ((grid[0] - sx) / vb_r) ** 2 + ((grid[1] - sy) / (0.85 * vb_r)) ** 2
    vbody = d2 < 1.0
    vol[vbody & ~disc_z] = HU["cancellous"]
    vol[vbody & ~disc_z & (d2 > 0.72)] = HU["cortical"]
    vol[vbody & disc_z] = HU["disc"]
    # posterior arch: a ring around the canal, a spinous process and transverse processes
    c2 = ((grid[0] - sx) / (0.5 * vb_r)) ** 2 + ((grid[1] - canal_y) / (0.5 * vb_r)) ** 2
    vol[(c2 < 2.6) & (c2 >= 1.0) & ~disc_z] = HU["cortical"] * 0.8
    spinous = (np.abs(grid[0] - sx) < 0.22 * vb_r) & (grid[1] < canal_y - 0.6 * vb_r) \
        & (grid[1] > canal_y - 2.0 * vb_r) & (zpos > 0.35 * period)
    vol[spinous & wall] = HU["cortical"] * 0.7
    transverse = (np.abs(grid[1] - (canal_y + 0.3 * vb_r)) < 0.3 * vb_r) \
        & (np.abs(grid[0] - sx) < 2.3 * vb_r) & (np.abs(grid[0] - sx) > 0.6 * vb_r) \
        & (zpos > 0.45 * period) & (zpos < 0.8 * period)
    vol[transverse] = HU["cortical"] * 0.6
    vol[np.broadcast_to(c2 < 1.0, vol.shape)] = HU["csf"]

    # great vessels in front of the spine: aorta (patient's left = low x), inferior vena cava (right)
    front = sy + 0.85 * vb_r
    _paint(vol, grid, (sx - 0.6 * vb_r + jit(1), front + 0.04 * n, zmid), (0.035 * n, 0.035 * n, 2.0 * n),
           HU["blood"], within=cavity)
    _paint(vol, grid, (sx + 1.2 * vb_r + jit(1), front + 0.03 * n, zmid), (0.042 * n, 0.03 * n, 2.0 * n),
           HU["blood"] - 5.0, within=cavity)

    # liver: large, on the patient's right (high x), upper half; spleen: left, posterior, upper
    lc = (cx + 0.2 * n + jit(3), cy + 0.02 * n + jit(2), 0.78 * n + jit(3))
    _paint(vol, grid, lc, (0.2 * n * (1 + 0.06 * rng.uniform(-1, 1)), 0.2 * n, 0.33 * n), HU["liver"],
           rotation=0.3, within=cavity & ~vbody)
    # hepatic vessels: a few darker tubes inside the liver
    for _ in range(3):
        vc = (lc[0] + jit(12), lc[1] + jit(10), lc[2] + jit(10))
        _paint(vol, grid, vc, (0.015 * n, 0.015 * n, 0.1 * n), HU["liver"] - 20.0, rotation=rng.uniform(0, 3),
               within=vol == HU["liver"])
    _paint(vol, grid, (cx - 0.27 * n + jit(2), cy - 0.05 * n + jit(2), 0.75 * n + jit(3)),
           (0.08 * n * (1 + 0.1 * rng.uniform(-1, 1)), 0.12 * n, 0.15 * n), HU["spleen"], rotation=-0.6,
           within=cavity)

    # kidneys: posterior, either side of the spine, tilted, with a darker medulla
    for side in (-1, 1):
        kc = (sx + side * (0.15 * n + jit(1.5)), sy + 0.3 * vb_r + jit(1.5),
              zmid + side * 0.04 * n + jit(3))
        kr = (0.075 * n * (1 + 0.08 * rng.uniform(-1, 1)), 0.05 * n,
              0.15 * n * (1 + 0.08 * rng.uniform(-1, 1)))
        rot = side * 0.5 + 0.1 * rng.uniform(-1, 1)
        _paint(vol, grid, kc, kr, HU["kidney_cortex"], rotation=rot, within=cavity & ~vbody)
        _paint(vol, grid, kc, tuple(0.6 * r for r in kr), HU["kidney_medulla"], rotation=rot,
               within=cavity & ~vbody)
        sinus = (kc[0] - side * 0.5 * kr[0], kc[1] + 0.1 * kr[1], kc[2])
        _paint(vol, grid, sinus, (0.3 * kr[0], 0.35 * kr[1], 0.35 * kr[2]), HU["fat"] + 30.0, rotation=rot,
               within=cavity & ~vbody)  # renal sinus fat

    # bowel loops in the anterior abdomen: soft-tissue walls with fluid content and gas pockets
    free = cavity & (vol < HU["fat"] + 21.0)
    for _ in range(int(rng.integers(24, 34))):
        c = (cx + rng.uniform(-0.3, 0.3) * n, cy + rng.uniform(-0.04, 0.22) * n, rng.uniform(0.05, 0.75) * n)
        r = rng.uniform(0.055, 0.09) * n
        radii = (r, r * rng.uniform(0.7, 1.0), r * rng.uniform(1.0, 1.8))
        rot = rng.uniform(0, np.pi)
        box, inside = _paint(vol, grid, c, radii, HU["bowel_wall"], rotation=rot, within=free)
        _paint(vol, grid, c, tuple(0.75 * q for q in radii), HU["bowel_content"], rotation=rot, within=free)
        if rng.uniform() < 0.6:  # gas rises anteriorly
            gc = (c[0], c[1] + 0.3 * radii[1], c[2])
            _paint(vol, grid, gc, (0.55 * radii[0], 0.4 * radii[1], 0.6 * radii[2]), HU["air"], rotation=rot,
                   within=free)

    # mild noise inside the body only, so that the air around is one constant (the minimum)
    noise = rng.standard_normal((n, n, n), dtype=np.float32) * 12.0
    vol[body] += noise[body]
    vol = np.clip(vol, HU["air"], 1500.0)
    return vol.astype(np.float32), body


def write_normal_scans(folder: str | Path, dataset: str, count: int, size: int = 128, seed: int = 0) -> list[Path]:
    """Write ``count`` normal toy scans as NIfTI: ``brain`` (deformed, re-contrasted MNI152 brains, float32
    in [0, 1] with a zero background, 1.5 mm voxels) or ``abdom`` (CT phantoms, int16 Hounsfield units,
    3 mm voxels). File names ``<dataset>_<index>.nii.gz``; deterministic in ``seed``. ``xray``: chest radiographs
    ``x_<index>.png``, ``size``^2 pixels (:func:`tools.xray_phantom.write_normal_radiographs`)."""
    import nibabel as nib

    if dataset == "xray":
        from tools.xray_phantom import write_normal_radiographs

        return write_normal_radiographs(folder, count, seed, size)
    if dataset not in ("brain", "abdom"):
        raise ValueError(f"dataset must be 'brain', 'abdom' or 'xray', got {dataset!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if dataset == "brain":
        template, foreground = mni152_brain(size)
    paths = []
    for i in range(count):
        if dataset == "brain":
            volume, _ = brain_partner(template, foreground, seed=seed * 100_003 + i)
            volume = (volume - volume.min()) / max(float(volume.max() - volume.min()), 1e-6)
            volume, spacing = volume.astype(np.float32), 1.5 * 128 / size
        else:
            volume, _ = ct_phantom(size, seed=seed * 100_003 + i)
            volume, spacing = np.round(volume).astype(np.int16), 3.0 * 128 / size
        path = folder / f"{dataset}_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(volume, np.diag([spacing, spacing, spacing, 1.0])), path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> list[Path]:
    import argparse

    parser = argparse.ArgumentParser(description="Write toy normal scans (no download needed).")
    parser.add_argument("--dataset", choices=("brain", "abdom", "xray"), required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--size", type=int, default=None,
                        help="cube side of a volume (default 128) or side of a radiograph (default 256, the paper's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    size = args.size or (256 if args.dataset == "xray" else 128)
    paths = write_normal_scans(args.output_dir, args.dataset, args.count, size, args.seed)
    print(f"wrote {len(paths)} {args.dataset} scans to {args.output_dir}")
    return paths


if __name__ == "__main__":
    main()
