"""Procedural chest radiographs, generated offline (nothing is downloaded), for the 2D models
(``bundle/configs/xray.yaml``): posteroanterior chest X-ray-like images with subject variability, and test anomalies
of kinds no self-supervised training task makes, with exact pixel labels, in a MOOD-like layout::

    <root>/xray/xray_train/x_NNNN.png                  normal radiographs, 16-bit grey PNG (round(65535 * image))
    <root>/xray/toy/toy_NNNN.png                       test cases: the first half normal, then one anomaly each
    <root>/xray/toy_label/pixel/toy_NNNN.nii.gz        uint8 masks, 2D NIfTI, identity affine, in MONAI's reader order
    <root>/xray/toy_label/sample/toy_NNNN.nii.gz.txt   "0" or "1"
    <root>/xray/toy_label/anomalies.json               per case: label, kinds ("normal" or the anomaly kind), bbox
    <root>/xray/toy_dicom/toy_NNNN.dcm                 (``dicom=True``) every toy case as a DX DICOM file

Images are float32 in [0, 1], dense = bright (as an X-ray is displayed), in row-major display order (rows top to
bottom, columns left to right); a PA view, so the patient's left is the image's right (the heart shadow sits right
of the centre). Each subject (one integer seed) has its own size, position, a rotation of a few degrees, lung shape,
diaphragm height, heart size, rib count and spacing, vessel tree, intensity gamma, window and noise level.

Axis order of the labels: MONAI's ``PILReader`` (and ``PydicomReader``) return a 2D image as (columns, rows), the
transpose of the row-major pixel array, and the bundle writes its maps in that order; so a label is stored as
``mask.T`` (array index ``[x, y]`` = column x, row y) next to the bundle's ``<stem>.nii.gz`` maps.

The test anomalies (:data:`ANOMALY_KINDS`) are deliberately unlike the training tasks (patch interpolation, Poisson
blending, deformation, smooth intensity change): ``nodule`` and ``mass`` (round / irregular opacities inside a
lung), ``pneumothorax`` (a dark, vessel-free crescent along the lateral apex of a lung, bounded by a thin bright
pleural line), ``effusion`` (a homogeneous bright lung base with a meniscus) and ``foreign_object`` (a coin or a
pin / wire). The pixel label of a case is where the anomalous image differs from the normal one by more than
:data:`MASK_TOLERANCE` (plus the anomaly's core), so it holds the pixels the anomaly changed. The toy cases place
their anomalies with the subject's exact anatomy (:func:`chest_geometry`: lungs, heart, and the vessel-marking
layer, so a pneumothorax removes exactly the markings); :func:`add_anomaly` also works on a bare image and body
mask, estimating the lungs from the image.

DICOM (``write_dicom_radiograph``): DX, For Presentation, MONOCHROME2, 12 of 16 bits (``round(4095 * image)``),
explicit VR little endian; the toy copies carry the full-range window (2047.5, 4096) and deterministic UIDs. A DX
file has no ImagePositionPatient, so MONAI's PydicomReader warns that the affine defaults to the identity.

CLI: ``PYTHONPATH=bundle:. python -m tools.xray_phantom --output_dir DIR [--train 20] [--toy 10] [--seed 0]
[--size 256] [--dicom]``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "ANOMALY_KINDS", "MASK_TOLERANCE", "add_anomaly", "chest_geometry", "chest_radiograph", "main",
    "toy_case", "toy_subject_seed", "train_subject_seed", "write_dicom_radiograph", "write_normal_radiographs",
    "write_xray_dataset",
]

ANOMALY_KINDS = ("nodule", "mass", "pneumothorax", "effusion", "foreign_object")
# |anomalous - normal| above this (display units, [0, 1]) is a labelled change; below it, a soft edge's tail
MASK_TOLERANCE = 0.01
MIN_SIZE = 32
# subject seeds: seed * _SEED_STRIDE + index for training images, + _TOY_OFFSET for toy cases; disjoint for every
# seed as long as each set has fewer than _TOY_OFFSET images
_SEED_STRIDE, _TOY_OFFSET = 100_000, 50_000
# SOP Class UID of Digital X-Ray Image Storage - For Presentation
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def train_subject_seed(seed: int, index: int) -> int:
    """The subject seed of training image ``index`` of a dataset written with ``seed``."""
    if not 0 <= index < _TOY_OFFSET:
        raise ValueError(f"training index must be in [0, {_TOY_OFFSET}), got {index}")
    return int(seed) * _SEED_STRIDE + int(index)


def toy_subject_seed(seed: int, index: int) -> int:
    """The subject seed of toy case ``index`` of a dataset written with ``seed`` (never a training subject's)."""
    if not 0 <= index < _SEED_STRIDE - _TOY_OFFSET:
        raise ValueError(f"toy index must be in [0, {_SEED_STRIDE - _TOY_OFFSET}), got {index}")
    return int(seed) * _SEED_STRIDE + _TOY_OFFSET + int(index)


# ------------------------------------------------------------------------------------------------ the subject
def _subject(seed: int) -> dict:
    """One subject's anatomy parameters, independent of the image size (so a subject looks alike at every size).
    Lengths are fractions of the image side, in the subject's own frame (X: lateral, 0 at the midline, negative
    towards the image left = patient's right; Y: 0 at the top, 1 at the bottom)."""
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    rng = np.random.default_rng([int(seed), 101])
    u = rng.uniform
    p = {
        "cx": 0.5 + u(-0.03, 0.03), "cy": 0.5 + u(-0.025, 0.025), "scale": u(0.88, 1.02),
        "angle": np.deg2rad(u(-4.0, 4.0)),
        "torso_w": u(0.37, 0.41), "shoulder_w": u(0.415, 0.45), "torso_p": u(2.4, 3.0), "shoulder_y": u(0.19, 0.22),
        "neck_w": u(0.075, 0.095),
        "mediastinum": u(0.05, 0.062), "aortic_knob": u(0.02, 0.035),
        # the heart's borders: half-widths from the midline, the height of their widest point and their half-height
        "heart_left": (u(0.17, 0.21), u(0.66, 0.7), u(0.21, 0.25)),
        "heart_right": (u(0.09, 0.12), u(0.6, 0.65), u(0.12, 0.16)),
        "n_ribs": int(rng.integers(9, 11)), "rib_top": u(0.155, 0.18), "rib_spacing": u(0.05, 0.057),
        "rib_alpha": u(0.28, 0.4), "rib_amp": u(0.04, 0.06), "clavicle_y": u(0.155, 0.185),
        "gas_bubble": bool(rng.uniform() < 0.6),
        "gamma": float(np.exp(u(-0.18, 0.18))), "low": u(0.02, 0.06), "high": u(0.9, 0.98),
        "quantum": u(0.006, 0.014), "mottle": u(0.015, 0.035), "lung_dark": u(0.23, 0.27),
    }
    lungs = []
    for side in (-1, 1):  # image left (patient's right), image right (patient's left)
        tc, a = u(0.165, 0.195), u(0.13, 0.155)
        yc, b = u(0.455, 0.49), u(0.28, 0.315)
        base = yc + b * u(0.93, 0.99) - (u(0.01, 0.03) if side < 0 else 0.0)  # the right dome sits higher
        lungs.append({"side": side, "tc": tc, "a": a, "yc": yc, "b": b, "p": u(2.2, 2.8), "base": base,
                      "dome": u(0.055, 0.085)})
    p["lungs"] = lungs
    p["vessel_seed"] = int(rng.integers(2**31))
    return p


def _frame(p: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The subject frame's coordinates (X, Y) of every pixel centre."""
    v, u = (np.mgrid[:size, :size] + 0.5) / size
    du, dv = u - p["cx"], v - p["cy"]
    c, s = np.cos(p["angle"]), np.sin(p["angle"])
    return (c * du + s * dv) / p["scale"], (-s * du + c * dv) / p["scale"] + 0.5


def _to_pixels(p: dict, size: int, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Subject frame -> (row, column) pixel coordinates (the inverse of :func:`_frame`)."""
    c, s = np.cos(p["angle"]), np.sin(p["angle"])
    du = p["scale"] * (c * x - s * (y - 0.5))
    dv = p["scale"] * (s * x + c * (y - 0.5))
    return (p["cy"] + dv) * size - 0.5, (p["cx"] + du) * size - 0.5


def _silhouette(p: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Half-width of the cardiomediastinal silhouette at height ``y`` on the side of ``x``: the mediastinum, the
    aortic knob bulging to the (patient's) left, and below them the heart's right and left borders."""
    knob = p["aortic_knob"] * np.exp(-(((y - 0.33) / 0.045) ** 2))
    def border(width, centre, half):  # enters smoothly from the mediastinum above, rounder below its widest point
        u = (y - centre) / half
        return (width - p["mediastinum"]) * np.clip(1 - u**2, 0, 1) ** np.where(u < 0, 1.5, 0.5)

    left = p["mediastinum"] + np.maximum(knob, border(*p["heart_left"]))
    right = p["mediastinum"] + border(*p["heart_right"])
    return np.where(x > 0, left, right)


def _lung_field(p: dict, lung: dict, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(inside, depth)`` of one lung: boolean inside, and its depth in [0, 1]
    (1 deep inside, 0 at the edge) for the lung's projected thickness."""
    t = x * lung["side"]
    half = lung["a"] * (1.0 + 0.22 * (y - lung["yc"]) / lung["b"])  # wider towards the base
    e = np.abs((t - lung["tc"]) / half) ** lung["p"] + np.abs((y - lung["yc"]) / lung["b"]) ** 2.2
    dome = lung["base"] - lung["dome"] * (1.0 - np.clip(((t - lung["tc"]) / lung["a"]) ** 2, 0.0, 1.0))
    inside = (e < 1.0) & (t > _silhouette(p, x, y)) & (y < dome) & (t > 0)
    depth = np.clip(1.0 - e, 0.0, 1.0) ** 0.5 * np.clip((dome - y) / 0.03, 0.0, 1.0)
    return inside, depth


def _band(distance: np.ndarray, half: float | np.ndarray, pixel: float) -> np.ndarray:
    """An anti-aliased band: 1 within ``half`` of a centreline, 0 beyond, a one-pixel ramp between."""
    return np.clip((half - np.abs(distance)) / pixel + 0.5, 0.0, 1.0)


def _vessels(p: dict, size: int, lungs: list[np.ndarray]) -> np.ndarray:
    """Branching vessel trees from each hilum, splatted on the pixel grid: bright near the hila, thinner and fainter
    towards the periphery; zero outside the lungs. A branch whose end leaves its lung stops branching."""
    rng = np.random.default_rng([p["vessel_seed"], 7])
    pix = 1.0 / (size * p["scale"])  # one pixel in the subject frame
    acc_thick = np.zeros(size * size)
    acc_thin = np.zeros(size * size)
    for lung in p["lungs"]:
        side = lung["side"]
        hilum = (side * (p["mediastinum"] + rng.uniform(0.03, 0.05)), lung["yc"] + rng.uniform(-0.04, 0.0))
        # five trunks fanning from the apex round to the base (angles from the lateral direction, y downwards)
        angles = np.linspace(-1.45, 1.25, 5) + rng.uniform(-0.15, 0.15, 5)
        direction = np.where(side > 0, angles, np.pi - angles)
        x0, y0 = np.full(5, hilum[0]), np.full(5, hilum[1])
        length = rng.uniform(0.05, 0.075, 5)
        weight = np.ones(5)
        for generation in range(8):
            x1, y1 = x0 + length * np.cos(direction), y0 + length * np.sin(direction)
            n = max(int(np.ceil(length.max() / pix * 1.5)), 2)
            f = np.linspace(0.0, 1.0, n)[None, :]
            rows, cols = _to_pixels(p, size, x0[:, None] + f * (x1 - x0)[:, None], y0[:, None] + f * (y1 - y0)[:, None])
            _splat(acc_thick if generation <= 1 else acc_thin, size, rows.ravel(), cols.ravel(),
                   np.repeat(weight, n))
            inside, _ = _lung_field(p, lung, x1, y1)
            keep = inside | (generation < 2)
            x0, y0, direction, length, weight = x1[keep], y1[keep], direction[keep], length[keep], weight[keep]
            if not x0.size:
                break
            spread = rng.uniform(0.3, 0.55, x0.size)
            turns = np.concatenate([-spread, spread * rng.uniform(0.6, 1.0, x0.size)])
            x0, y0 = np.tile(x0, 2), np.tile(y0, 2)
            direction = np.tile(direction, 2) + turns + rng.normal(0.0, 0.08, turns.size)
            length = np.tile(length, 2) * rng.uniform(0.72, 0.84, turns.size)
            weight = np.tile(weight, 2) * rng.uniform(0.62, 0.74, turns.size)
    scale = size / 256.0
    markings = (ndi.gaussian_filter(acc_thick.reshape(size, size), max(1.5 * scale, 0.7)) * 1.3
                + ndi.gaussian_filter(acc_thin.reshape(size, size), max(0.8 * scale, 0.55)))
    lung_any = lungs[0] | lungs[1]
    markings *= ndi.gaussian_filter(lung_any.astype(float), max(1.0 * scale, 0.5))
    top = float(np.percentile(markings[lung_any], 99.5)) if lung_any.any() else 1.0
    return np.clip(markings / max(top, 1e-9), 0.0, 1.3) ** 0.6  # the fine peripheral vessels stay visible


def _splat(acc: np.ndarray, size: int, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray) -> None:
    """Bilinear splatting of weighted points into the flat ``size`` x ``size`` ``acc`` (points outside dropped)."""
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    fr, fc = rows - r0, cols - c0
    for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (1, 0, fr * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 1, fr * fc)):
        r, c = r0 + dr, c0 + dc
        keep = (r >= 0) & (r < size) & (c >= 0) & (c < size)
        acc += np.bincount(r[keep] * size + c[keep], weights=(weights * w)[keep], minlength=size * size)


def _anatomy(p: dict, size: int) -> dict:
    """The subject's masks and density layers on a ``size`` x ``size`` grid."""
    x, y = _frame(p, size)
    pix = 1.0 / (size * p["scale"])
    t = np.abs(x)
    # soft tissue: the outline's half-width at each height (neck, the trapezius slope to the shoulders, the chest
    # wall narrowing to the waist) and a cylinder-like thickness profile in [0, 1]
    neck_base, shoulder = p["shoulder_y"] - 0.11, p["shoulder_y"] + 0.03
    q = np.linspace(0.0, 1.0, 65)  # the shoulder line: a slope from the neck, rounding down at the tip
    upper = np.interp(y, neck_base + (shoulder - neck_base) * (0.7 * q + 0.3 * q**5),
                      p["neck_w"] + (p["shoulder_w"] - p["neck_w"]) * q)
    lower = p["torso_w"] + (p["shoulder_w"] - p["torso_w"]) * np.exp(-(((y - shoulder) / 0.07) ** 2))
    lower = lower * (1.0 - 0.06 * np.clip((y - 0.75) / 0.3, 0.0, 1.0))
    half_width = np.where(y < shoulder, upper, lower)
    body = t < half_width
    thickness = np.sqrt(np.clip(1.0 - (t / half_width) ** p["torso_p"], 0.0, 1.0))
    thickness *= 0.75 + 0.25 * np.clip((y - neck_base) / 0.15, 0.0, 1.0)
    lungs, depths = [], []
    for lung in p["lungs"]:
        inside, depth = _lung_field(p, lung, x, y)
        inside &= body
        lungs.append(inside)
        depths.append(depth * inside)
    silhouette = (t < _silhouette(p, x, y)) & (y > 0.1) & body
    # the heart: the silhouette below the vascular pedicle, down to the diaphragm (it merges into the abdomen)
    heart_top = min(p["heart_left"][1] - p["heart_left"][2], p["heart_right"][1] - p["heart_right"][2]) + 0.06
    heart_bottom = p["lungs"][1]["base"] + 0.02
    heart = silhouette & (y > heart_top) & (y < heart_bottom) & (t > 0.0)
    mediastinum = silhouette & ~heart & (y < heart_bottom)
    spine = (t < 0.032) & body
    return {"x": x, "y": y, "pix": pix, "thickness": thickness, "body": body, "heart": heart,
            "lungs": lungs, "depths": depths, "mediastinum": mediastinum, "spine": spine}


def _bones(p: dict, a: dict) -> np.ndarray:
    """Ribs (posterior arcs and faint anterior ones), clavicles and the spine's vertebrae, as added density."""
    x, y, pix = a["x"], a["y"], a["pix"]
    t, side_ok = np.abs(x), a["body"]
    bones = np.zeros_like(x)
    cage_w = max(lung["tc"] + lung["a"] for lung in p["lungs"]) + 0.025
    for k in range(p["n_ribs"]):
        y0 = p["rib_top"] + k * p["rib_spacing"] * (1.0 + 0.035 * k)
        beta = 1.7 + 1.6 * np.exp(-k / 1.8)
        centre = y0 - p["rib_alpha"] * t + beta * t**2
        slope = np.abs(-p["rib_alpha"] + 2 * beta * t)
        half = (0.0085 + 0.0011 * k) * np.sqrt(1.0 + slope**2)
        reach = cage_w * np.clip(0.55 + 0.16 * k, 0.0, 1.0)  # the upper ribs are short arcs round the apex
        along = np.clip((t - 0.03) / 0.02, 0.0, 1.0) * np.clip((reach - t) / 0.03, 0.0, 1.0)
        rib = _band(y - centre, half, pix) * along
        cortex = 1.0 + 0.35 * (_band(y - centre, half, pix) - _band(y - centre, 0.55 * half, pix))
        bones += p["rib_amp"] * rib * cortex
        if k < 7:  # anterior ribs: from the lateral wall down towards the sternum, faint, fading medially
            ya = y0 + 0.05 + 0.45 * np.clip(cage_w - t, 0.0, None) ** 1.3
            fade = np.clip((t - 0.1) / 0.08, 0.0, 1.0) * np.clip((cage_w - 0.02 - t) / 0.03, 0.0, 1.0)
            bones += 0.35 * p["rib_amp"] * _band(y - ya, 0.011, pix) * fade
    clavicle = p["clavicle_y"] - 0.1 * (t - 0.04) + 0.45 * (t - 0.17) ** 2
    reach = np.clip((t - 0.025) / 0.015, 0, 1) * np.clip((0.31 - t) / 0.03, 0, 1)
    bones += 0.2 * _band(y - clavicle, 0.0125 + 0.004 * np.exp(-((t - 0.05) / 0.03) ** 2), pix) * reach
    # vertebrae: bodies through the whole column, darker disc spaces between them
    spine_profile = np.sqrt(np.clip(1 - (x / 0.032) ** 2, 0, 1))
    disc = _band(((y - p["rib_top"]) / 0.047 + 0.5) % 1.0 - 0.5, 0.09, pix / 0.047)
    bones += spine_profile * (0.11 - 0.05 * disc)
    return bones * side_ok


def _render(p: dict, size: int, seed: int, markings: bool = True) -> tuple[np.ndarray, dict]:
    """The radiograph of subject ``p`` (and its anatomy); ``markings=False`` leaves the vessel markings out, with
    every random draw the same (so the difference is exactly the markings)."""
    a = _anatomy(p, size)
    x, y, pix = a["x"], a["y"], a["pix"]
    t = np.abs(x)
    density = np.where(a["body"], 0.2 + 0.13 * a["thickness"], 0.0)
    # mediastinum and heart: extra soft tissue in front of the spine; the trachea a dark air column above the carina
    density += 0.09 * (a["mediastinum"] | a["heart"]) * np.clip((y - 0.12) / 0.05, 0, 1)
    left, right = _silhouette(p, np.ones(1), y), _silhouette(p, -np.ones(1), y)
    across = np.sqrt(np.clip(1 - ((x - (left - right) / 2) / ((left + right) / 2)) ** 2, 0, 1))
    heart_top = min(p["heart_left"][1] - p["heart_left"][2], p["heart_right"][1] - p["heart_right"][2])
    rise = np.clip((y - heart_top - 0.02) / 0.1, 0.0, 1.0)
    below = np.clip((p["lungs"][1]["base"] + 0.04 - y) / 0.1, 0.0, 1.0)  # merging into the abdomen below the dome
    density += 0.035 * across * rise * below * a["body"]
    trachea = _band(x - 0.004 * (y - 0.2) / 0.2, 0.013, pix) * np.clip((0.37 - y) / 0.02, 0, 1) * a["body"]
    density -= 0.08 * trachea
    if p["gas_bubble"]:  # gastric air under the left hemidiaphragm
        lung = p["lungs"][1]
        gx, gy = lung["tc"] + 0.02, lung["base"] + 0.045
        bubble = ((x - gx) / 0.05) ** 2 + ((y - gy) / 0.03) ** 2
        density -= 0.12 * np.sqrt(np.clip(1 - bubble, 0, 1)) * (y > gy - 0.012) * a["body"]
    lungs = a["lungs"][0] | a["lungs"][1]
    depth = a["depths"][0] + a["depths"][1]
    density -= p["lung_dark"] * (0.6 + 0.4 * depth) * lungs
    density += _bones(p, a)
    # display: gamma, window, detector blur, smooth mottle and quantum noise (more noise where denser)
    rng = np.random.default_rng([int(seed), int(size), 3])
    image = (1.0 - np.exp(-2.3 * np.clip(density, 0.0, None))) / (1.0 - np.exp(-2.3 * 0.75))  # exposure to display
    image = np.clip(image, 0.0, 1.0) ** p["gamma"]
    image = p["low"] + (p["high"] - p["low"]) * image
    # the vessel markings, added on the display scale (so that they are a layer of their own, independent of the
    # ribs behind them): brighter near the hila
    if markings:
        image = image + (0.15 + 0.1 * np.exp(-((t - 0.1) / 0.22) ** 2)) * _vessels(p, size, a["lungs"])
    image = ndi.gaussian_filter(image, max(0.5, 0.6 * size / 256.0))
    mottle = ndi.gaussian_filter(rng.standard_normal((size, size)), size / 12.0)
    mottle /= mottle.std() + 1e-12
    image *= 1.0 + p["mottle"] * mottle * a["body"]
    image += p["quantum"] * (0.6 + 0.8 * image) * rng.standard_normal((size, size))
    return np.clip(image, 0.0, 1.0).astype(np.float32), a


def _check_size(size: int) -> int:
    if int(size) < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE}, got {size}")
    return int(size)


def chest_radiograph(seed: int, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A posteroanterior chest radiograph of subject ``seed``: ``(image, body)``, the image float32 in [0, 1]
    (dense bright), shape ``(size, size)`` in row-major display order, and the boolean body mask (the patient, not
    the air around). Deterministic in ``(seed, size)``; the subject's anatomy does not depend on ``size``."""
    size = _check_size(size)
    image, anatomy = _render(_subject(seed), size, seed)
    return image, anatomy["body"].copy()


def chest_geometry(seed: int, size: int = 256) -> dict:
    """Subject ``seed``'s anatomy as :func:`chest_radiograph` draws it, boolean masks of shape ``(size, size)``:
    ``body``, ``lungs`` (both), ``lung_right`` (image left), ``lung_left`` (image right), ``heart``,
    ``mediastinum``, ``spine``; and ``markings``, float32: the part of the image that the lung vessel markings make
    (the image minus its rendering without them). Pass it to :func:`add_anomaly` for exact anatomy."""
    size = _check_size(size)
    p = _subject(seed)
    image, a = _render(p, size, seed)
    plain, _ = _render(p, size, seed, markings=False)
    return {"body": a["body"], "lungs": a["lungs"][0] | a["lungs"][1], "lung_right": a["lungs"][0],
            "lung_left": a["lungs"][1], "heart": a["heart"], "mediastinum": a["mediastinum"],
            "spine": a["spine"], "markings": (image - plain).astype(np.float32)}


# ------------------------------------------------------------------------------------------------- anomalies
def _estimate_lungs(image: np.ndarray, body: np.ndarray) -> list[np.ndarray]:
    """The two lungs of a radiograph without its geometry: the dark part of the (smoothed) body, split at the
    body's middle column, the largest component on each side."""
    size = image.shape[0]
    smooth = ndi.gaussian_filter(image.astype(np.float64), max(size / 64.0, 0.8))
    inner = ndi.distance_transform_edt(body) > max(size / 40.0, 1.0)
    values = smooth[inner] if inner.any() else smooth[body]
    # Otsu's threshold on the body's smoothed values
    hist, edges = np.histogram(values, bins=128)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = ((hist * centres).sum() - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    threshold = centres[int(np.argmax(w0 * w1 * (m0 - m1) ** 2))]
    dark = ndi.binary_opening(inner & (smooth < threshold), iterations=max(1, size // 128))
    middle = int(round(np.nonzero(body.any(axis=0))[0].mean())) if body.any() else size // 2
    lungs = []
    for half in (slice(0, middle), slice(middle, size)):
        part = np.zeros_like(dark)
        part[:, half] = dark[:, half]
        labels, count = ndi.label(part)
        if count:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            part = labels == int(sizes.argmax())
        lungs.append(part)
    return lungs


def _noise_sigma(image: np.ndarray, body: np.ndarray) -> float:
    """A robust estimate of the image's pixel noise inside the body (the MAD of its difference to a 3x3 median)."""
    residual = (image - ndi.median_filter(image, size=3))[body]
    if residual.size == 0:
        return 0.01
    return float(1.4826 * np.median(np.abs(residual - np.median(residual))) * 1.2)


def _pick(region: np.ndarray, rng: np.random.Generator, margin: float) -> tuple[int, int]:
    """A random pixel of ``region`` at least ``margin`` pixels from its outside (less, if none is that far)."""
    distance = ndi.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    for scale in (1.0, 0.75, 0.5, 0.25, 0.0):
        rows, cols = np.nonzero(distance > margin * scale)
        if rows.size:
            i = int(rng.integers(rows.size))
            return int(rows[i]), int(cols[i])
    raise ValueError("the region for the anomaly is empty")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[:size, :size].astype(np.float64)


def _opacity(image, rng, lung, size, radius, irregular: bool):
    """A soft-edged round (``irregular=False``) or lobulated opacity inside ``lung``: the new image and its core."""
    rr, cc = _grid(size)
    r0, c0 = _pick(lung, rng, 0.9 * radius if not irregular else 0.55 * radius)
    aspect, turn = rng.uniform(0.85, 1.15), rng.uniform(0, np.pi)
    dr, dc = rr - r0, cc - c0
    u = (np.cos(turn) * dr + np.sin(turn) * dc) / aspect
    v = (-np.sin(turn) * dr + np.cos(turn) * dc) * aspect
    r = np.hypot(u, v) / radius
    if irregular:  # lobulated outline, and a smooth bumpy interior
        theta = np.arctan2(v, u)
        outline = 1.0 + sum(rng.uniform(0.03, 0.14) / np.sqrt(k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
                            for k in range(2, 7))
        r = r / outline
        profile = np.clip((1.08 - r) / 0.25, 0.0, 1.0) ** 0.8
        texture = ndi.gaussian_filter(rng.standard_normal((size, size)), max(radius / 4, 1.0))
        profile *= 0.88 + 0.12 * np.clip(texture / (texture.std() + 1e-12), -2, 2) / 2
        amplitude = rng.uniform(0.28, 0.42)
    else:
        profile = np.clip(1.0 - r**2, 0.0, 1.0) ** 0.6
        amplitude = rng.uniform(0.2, 0.32)
    profile *= ndi.gaussian_filter(lung.astype(float), max(size / 256.0, 0.6)) * lung  # stays inside the lung
    new = image + amplitude * np.clip(profile, 0, 1) * (1.0 - image)
    return new, (profile > 0.5) & lung


def _pneumothorax(image, body, rng, lung, size, markings):
    """Air between the chest wall and the collapsed lung along the lung's lateral apex: markings gone, darker, and the
    visceral pleural line, thin and bright, at the collapsed lung's edge."""
    rows, cols = np.nonzero(lung)
    top, bottom = rows.min(), rows.max()
    middle = np.nonzero(body.any(axis=0))[0].mean()
    lateral_is_left = cols.mean() < middle
    # the lung collapses towards its medial lower part (the hilum and the ligament)
    anchor_r = top + rng.uniform(0.85, 0.95) * (bottom - top)
    at = lung[int(round(anchor_r))] if lung[int(round(anchor_r))].any() else lung.any(axis=0)
    at_cols = np.nonzero(at)[0]
    anchor_c = at_cols.max() if lateral_is_left else at_cols.min()
    kr, kc = rng.uniform(0.78, 0.88), rng.uniform(0.7, 0.84)
    rr, cc = _grid(size)
    collapsed = ndi.map_coordinates(lung.astype(float), [anchor_r + (rr - anchor_r) / kr,
                                                         anchor_c + (cc - anchor_c) / kc], order=1) > 0.5
    collapsed &= lung
    region = lung & ~collapsed
    line = collapsed & ndi.binary_dilation(region, iterations=1)
    if markings is None:  # no geometry: take the markings away with a median filter, keep the noise level
        sigma = _noise_sigma(image, body)
        base = ndi.median_filter(image, size=max(3, int(round(size / 64)) * 2 + 1))
        plain = base + sigma * rng.standard_normal(image.shape)
    else:
        plain = image - markings
    # no lung tissue in the pleural space: its smooth background (the lung's own shading) becomes one dark level;
    # what the chest wall puts there (ribs) and the noise stay
    inside = region.astype(np.float64)
    spread = max(size / 40.0, 1.5)
    background = ndi.gaussian_filter(plain * inside, spread) / np.maximum(ndi.gaussian_filter(inside, spread), 1e-6)
    level = float(np.percentile(background[region], 10)) - rng.uniform(0.05, 0.09) if region.any() else 0.0
    new = image.copy()
    new[region] = np.maximum(level + (plain - background)[region], 0.01)
    new[line] = np.maximum(image[line], plain[line] + rng.uniform(0.08, 0.14))
    return new, region | line


def _effusion(image, body, rng, lung, size):
    """Fluid in the lung base: a homogeneous bright opacity whose top surface (the meniscus) is concave upwards,
    climbing along the lateral chest wall."""
    rows, cols = np.nonzero(lung)
    top, bottom = rows.min(), rows.max()
    height = bottom - top
    middle = np.nonzero(body.any(axis=0))[0].mean()
    lateral_is_left = cols.mean() < middle
    medial, lateral = (cols.max(), cols.min()) if lateral_is_left else (cols.min(), cols.max())
    level = bottom - rng.uniform(0.22, 0.38) * height
    rr, cc = _grid(size)
    across = np.clip((cc - medial) / (lateral - medial), 0.0, 1.2)  # 0 medially, 1 at the lateral wall
    meniscus = level - rng.uniform(0.15, 0.25) * height * across**3
    ramp = max(size / 256.0, 0.6)
    weight = np.clip((rr - meniscus) / ramp + 0.5, 0.0, 1.0) * lung
    soft_tissue = float(np.percentile(image[body & ~ndi.binary_dilation(lung, iterations=2)], 55)) if body.any() \
        else 0.6
    fluid = soft_tissue * rng.uniform(0.9, 1.05) + 0.04 * np.clip((rr - level) / max(height, 1), 0, 1)
    fluid = np.maximum(fluid, image[lung].mean() + 0.15)
    fluid = fluid + _noise_sigma(image, body) * rng.standard_normal(image.shape)
    new = (1.0 - weight) * image + weight * fluid
    return new, weight >= 0.5


def _foreign_object(image, body, rng, size):
    """A coin (a bright sharp disc) or a pin / wire (a bright thin line, maybe with a head), inside the body."""
    rr, cc = _grid(size)
    value = rng.uniform(0.94, 1.0)
    if rng.uniform() < 0.5:
        radius = max(rng.uniform(0.025, 0.045) * size, 2.0)
        r0, c0 = _pick(body, rng, radius + 2)
        coverage = np.clip(radius - np.hypot(rr - r0, cc - c0) + 0.5, 0.0, 1.0)
    else:
        length = max(rng.uniform(0.08, 0.2) * size, 6.0)
        r0, c0 = _pick(body, rng, length / 2 + 2)
        angle = rng.uniform(0, np.pi)
        dr, dc = np.sin(angle), np.cos(angle)
        along = np.clip((rr - r0) * dr + (cc - c0) * dc, -length / 2, length / 2)
        distance = np.hypot(rr - (r0 + along * dr), cc - (c0 + along * dc))
        half = max(0.004 * size, 0.7)
        coverage = np.clip(half - distance + 0.5, 0.0, 1.0)
        if rng.uniform() < 0.5:  # a pin's head
            head = max(0.012 * size, 1.2)
            coverage = np.maximum(coverage, np.clip(head - np.hypot(rr - (r0 + length / 2 * dr),
                                                                    cc - (c0 + length / 2 * dc)) + 0.5, 0.0, 1.0))
    coverage *= body
    metal = value + 0.2 * _noise_sigma(image, body) * rng.standard_normal(image.shape)
    new = (1.0 - coverage) * image + coverage * np.maximum(metal, image)
    return new, coverage >= 0.5


def add_anomaly(image: np.ndarray, body: np.ndarray, kind: str, rng: np.random.Generator,
                geometry: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (a radiograph of :func:`chest_radiograph`, row-major, [0, 1]) with one anomaly of ``kind``:
    ``(anomalous, mask)``, the image float32 in [0, 1] and the boolean mask of where it differs meaningfully (more
    than :data:`MASK_TOLERANCE`, plus the anomaly's core), inside ``body`` and never empty.

    ``geometry`` (:func:`chest_geometry` of the same subject and size) gives the exact lungs and vessel markings;
    without it the lungs are estimated from the image (its dark part inside the body) and a pneumothorax's markings
    are removed with a median filter. ``rng``: a ``numpy.random.Generator`` (or an int seed)."""
    if kind not in ANOMALY_KINDS:
        raise ValueError(f"kind must be one of {ANOMALY_KINDS}, got {kind!r}")
    image = np.asarray(image, dtype=np.float64)
    body = np.asarray(body, dtype=bool)
    if image.ndim != 2 or image.shape != body.shape:
        raise ValueError(f"image and body must be 2D of one shape, got {image.shape} and {body.shape}")
    if not body.any():
        raise ValueError("the body mask is empty")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    size = image.shape[0]
    if geometry is not None:
        lungs = [np.asarray(geometry["lung_right"], bool), np.asarray(geometry["lung_left"], bool)]
        markings = np.asarray(geometry["markings"], dtype=np.float64)
    else:
        lungs, markings = _estimate_lungs(image, body), None
    lungs = [lung & body for lung in lungs]
    for _ in range(10):  # a draw that changes nothing (possible only on tiny images) is drawn again
        choices = [i for i, lung in enumerate(lungs) if lung.sum() >= 4] or [None]
        side = choices[int(rng.integers(len(choices)))]
        lung = lungs[side] if side is not None else body
        if kind == "nodule":
            new, core = _opacity(image, rng, lung, size, max(rng.uniform(0.02, 0.04) * size, 1.5), irregular=False)
        elif kind == "mass":
            new, core = _opacity(image, rng, lung, size, max(rng.uniform(0.06, 0.12) * size, 2.5), irregular=True)
        elif kind == "pneumothorax":
            new, core = _pneumothorax(image, body, rng, lung, size, markings)
        elif kind == "effusion":
            new, core = _effusion(image, body, rng, lung, size)
        else:
            new, core = _foreign_object(image, body, rng, size)
        new = np.clip(new, 0.0, 1.0).astype(np.float32)
        changed = np.abs(new.astype(np.float64) - image) > MASK_TOLERANCE
        mask = ndi.binary_fill_holes((core & (new != image)) | changed) & body
        if mask.any():
            return new, mask
    raise RuntimeError(f"could not place a {kind} in this image")


# ------------------------------------------------------------------------------------------------------ files
def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    values = np.round(65535.0 * np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)).astype(np.uint16)
    picture = Image.fromarray(values)  # uint16 -> mode "I;16"
    if picture.mode != "I;16":
        raise RuntimeError(f"PIL made a {picture.mode!r} image of uint16 data, not 'I;16'")
    picture.save(path)


def write_dicom_radiograph(path: str | Path, image: np.ndarray, window: tuple[float, float] | None = None,
                           pixel_spacing: tuple[float, float] = (0.7, 0.7), uid_entropy: str | None = None) -> Path:
    """``image`` (row-major, [0, 1]) as a DICOM Part 10 file: a PA chest DX image (Digital X-Ray Image Storage - For
    Presentation), MONOCHROME2, 16 bits allocated, 12 stored (values ``round(4095 * image)``), explicit VR little
    endian, uncompressed; ``PixelSpacing`` and ``ImagerPixelSpacing`` ``pixel_spacing`` (mm, row then column), and
    ``WindowCenter``/``WindowWidth`` when ``window=(center, width)`` (in stored values) is given. The UIDs are derived
    deterministically from ``uid_entropy`` (default: the file name and the pixel data)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path = Path(path)
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"a radiograph is 2D, got shape {image.shape}")
    pixels = np.round(4095.0 * np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)).astype(np.uint16)
    if uid_entropy is None:
        uid_entropy = f"{path.name}:{hashlib.sha256(pixels.tobytes()).hexdigest()}"

    def uid(role: str) -> str:
        return generate_uid(entropy_srcs=[uid_entropy, role])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = uid("instance")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = DX_FOR_PRESENTATION, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
    ds.FrameOfReferenceUID = uid("frame")
    ds.PatientName, ds.PatientID = "PHANTOM^CHEST", f"XRAY-{uid_entropy[:8]}"
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Modality, ds.Manufacturer = "DX", "tools.xray_phantom"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined, ds.ViewPosition, ds.PatientOrientation = "CHEST", "PA", ["L", "F"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = ds.ImagerPixelSpacing = [float(pixel_spacing[0]), float(pixel_spacing[1])]
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", 1
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression, ds.BurnedInAnnotation = "00", "NO"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = float(window[0]), float(window[1])
    ds.PixelData = pixels.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _bbox(mask: np.ndarray) -> list[list[int]] | None:
    """``[[lo, hi), ...]`` per axis of ``mask`` (None when empty)."""
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append([int(idx[0]), int(idx[-1]) + 1])
    return box


def toy_case(index: int, n_toy: int, seed: int = 0, size: int = 256):
    """Toy case ``index`` of ``n_toy``: ``(normal, image, mask, info)``. The first ``n_toy // 2`` cases are normal,
    the others each get one anomaly kind, in turn (:data:`ANOMALY_KINDS`)."""
    subject = toy_subject_seed(seed, index)
    n_normal = n_toy // 2
    normal, body = chest_radiograph(subject, size)
    if index < n_normal:
        return normal, normal, np.zeros_like(body), {"label": 0, "kinds": ["normal"], "subject": subject}
    kind = ANOMALY_KINDS[(index - n_normal) % len(ANOMALY_KINDS)]
    rng = np.random.default_rng([int(seed), int(index), 29])
    image, mask = add_anomaly(normal, body, kind, rng, geometry=chest_geometry(subject, size))
    return normal, image, mask, {"label": 1, "kinds": [kind], "subject": subject}


def write_normal_radiographs(folder: str | Path, count: int, seed: int = 0, size: int = 256) -> list[Path]:
    """Write ``count`` normal radiographs ``x_NNNN.png`` (16-bit grey) into ``folder``: the training images of
    :func:`write_xray_dataset` with the same ``seed`` (``make normals DATASET=xray``)."""
    size = _check_size(size)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        paths.append(folder / f"x_{i:04d}.png")
        _write_png(paths[-1], chest_radiograph(train_subject_seed(seed, i), size)[0])
    return paths


def write_xray_dataset(output_dir: str | Path, n_train: int = 20, n_toy: int = 10, seed: int = 0, size: int = 256,
                       dicom: bool = False) -> dict:
    """Write the layout of the module docstring under ``output_dir/xray``: ``n_train`` normal training radiographs and
    ``n_toy`` toy cases (the first half normal, then the anomaly kinds in turn; every kind appears when ``n_toy >=
    2 * len(ANOMALY_KINDS)``) with their labels, and with ``dicom`` every toy case also as a DX DICOM file. Returns
    a summary: ``root``, the folders, ``train``/``toy``/``dicom`` (file lists), ``n_train``, ``n_toy``,
    ``n_anomalous`` and ``cases`` (as in ``anomalies.json``, keyed by label name ``toy_NNNN.nii.gz``)."""
    import nibabel as nib

    size = _check_size(size)
    if n_train < 0 or n_toy < 0:
        raise ValueError(f"n_train and n_toy must be >= 0, got {n_train} and {n_toy}")
    root = Path(output_dir) / "xray"
    folders = {"train_dir": root / "xray_train", "toy_dir": root / "toy", "pixel_dir": root / "toy_label" / "pixel",
               "sample_dir": root / "toy_label" / "sample"}
    if dicom:
        folders["dicom_dir"] = root / "toy_dicom"
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    train = [str(path) for path in write_normal_radiographs(folders["train_dir"], n_train, seed, size)]
    cases, toy, dicoms = {}, [], []
    for i in range(n_toy):
        stem = f"toy_{i:04d}"
        _, image, mask, info = toy_case(i, n_toy, seed, size)
        _write_png(folders["toy_dir"] / f"{stem}.png", image)
        toy.append(str(folders["toy_dir"] / f"{stem}.png"))
        label = np.ascontiguousarray(mask.T.astype(np.uint8))  # MONAI's reader order: [column, row]
        nib.save(nib.Nifti1Image(label, np.eye(4)), folders["pixel_dir"] / f"{stem}.nii.gz")
        (folders["sample_dir"] / f"{stem}.nii.gz.txt").write_text(f"{info['label']}\n")
        if dicom:
            dicoms.append(str(write_dicom_radiograph(folders["dicom_dir"] / f"{stem}.dcm", image,
                                                     window=(2047.5, 4096.0), uid_entropy=f"xray:{seed}:{stem}")))
        cases[f"{stem}.nii.gz"] = {**info, "image": f"{stem}.png", "bbox": _bbox(label.astype(bool))}
    meta = {"dataset": "xray", "size": size, "seed": int(seed), "kinds": list(ANOMALY_KINDS),
            "label_axes": "[column, row]: the transpose of the PNG's row-major array, as MONAI's PILReader reads it",
            "cases": cases}
    (root / "toy_label" / "anomalies.json").write_text(json.dumps(meta, indent=1))
    return {"root": str(root), **{k: str(v) for k, v in folders.items()}, "train": train, "toy": toy,
            "dicom": dicoms, "n_train": n_train, "n_toy": n_toy,
            "n_anomalous": sum(c["label"] for c in cases.values()), "cases": cases}


def main(argv: list[str] | None = None) -> dict:
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Write procedural chest radiographs in a MOOD-like layout: normal "
                                                 "training images and toy test cases with held-out anomaly kinds "
                                                 "and their labels; nothing is downloaded.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--train", type=int, default=20, help="normal training radiographs")
    parser.add_argument("--toy", type=int, default=10, help="toy test cases (the first half normal)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256, help="side of every image in pixels")
    parser.add_argument("--dicom", action="store_true", help="also every toy case as a DX DICOM file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    written = write_xray_dataset(args.output_dir, args.train, args.toy, args.seed, args.size, args.dicom)
    print(f"xray: {written['n_train']} training images, {written['n_toy']} toy cases ({written['n_anomalous']} "
          f"anomalous){' with DICOM' if args.dicom else ''}, {args.size}^2, in {written['root']} "
          f"({time.perf_counter() - start:.1f} s)")
    return written


if __name__ == "__main__":
    main()
