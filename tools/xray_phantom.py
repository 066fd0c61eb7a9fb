"""Procedural chest radiographs for the 2D models (``bundle/configs/xray.yaml``): posteroanterior chest X-ray-like
images with subject variability, and test anomalies of kinds no training task makes, with exact labels, in a
MOOD-like layout. Nothing is downloaded.

    PYTHONPATH=bundle:. .venv/bin/python -m tools.xray_phantom --output_dir DATA [--train 20] [--toy 10] [--seed 0]
        [--size 256] [--dicom]

writes ``DATA/xray/xray_train/x_NNNN.png`` (normal, 16-bit grey PNG), ``DATA/xray/toy/toy_NNNN.png`` (the first half
normal, the others each with one anomaly of :data:`ANOMALY_KINDS`, in turn), ``DATA/xray/toy_label/pixel/
toy_NNNN.nii.gz`` (the masks, 2D NIfTI in MONAI's reader order: the transpose of the picture, as the bundle writes
its maps), ``toy_label/sample/toy_NNNN.nii.gz.txt`` and ``toy_label/anomalies.json``; with ``--dicom`` also every toy
case as ``toy_dicom/toy_NNNN.dcm`` (DX, 12 bits, with a window).

Images are float in [0, 1], dense bright, row-major (rows top to bottom); the patient's left is the image's right.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

__all__ = ["ANOMALY_KINDS", "add_anomaly", "chest_radiograph", "write_dicom_radiograph", "write_xray_dataset"]

ANOMALY_KINDS = ("nodule", "mass", "pneumothorax", "effusion", "foreign_object")
_TRAIN_SEED, _TOY_SEED = 1_000_003, 2_000_003  # subject seeds of training and toy images never meet


def _ellipse(yy, xx, cy, cx, ry, rx, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    y, x = yy - cy, xx - cx
    return ((c * y + s * x) / ry) ** 2 + ((-s * y + c * x) / rx) ** 2


def _smooth_noise(rng, shape, sigma):
    noise = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    return noise / (noise.std() + 1e-8)


def _anatomy(rng: np.random.Generator, size: int) -> dict:
    """The subject's geometry on a unit grid (coordinates in [0, 1]): the masks every image and anomaly uses."""
    yy, xx = np.mgrid[:size, :size] / (size - 1)
    tilt = rng.uniform(-0.05, 0.05)
    cx = 0.5 + rng.uniform(-0.03, 0.03)
    width = rng.uniform(0.36, 0.42)
    body = _ellipse(yy, xx, 0.62, cx, 0.62, width, tilt) < 1
    shoulders = _ellipse(yy, xx, 0.2, cx, 0.12, width + 0.08, tilt) < 1
    body |= shoulders & (yy > 0.08)
    lungs = []
    for side in (-1, 1):  # image left (patient's right), image right
        lx = cx + side * rng.uniform(0.15, 0.18)
        lung = _ellipse(yy, xx, 0.5, lx, rng.uniform(0.27, 0.31), rng.uniform(0.11, 0.13), -side * 0.12 + tilt) < 1
        lung &= yy > 0.2 + rng.uniform(0, 0.03)
        lungs.append(lung)
    heart = _ellipse(yy, xx, 0.66, cx + rng.uniform(0.04, 0.07), rng.uniform(0.11, 0.14), rng.uniform(0.12, 0.16),
                     0.5) < 1
    lungs[1] &= ~heart  # the heart shadow covers part of the left lung
    return {"yy": yy, "xx": xx, "cx": cx, "tilt": tilt, "body": body, "lungs": lungs, "heart": heart}


def _render(anatomy: dict, rng: np.random.Generator, size: int, remove_markings: np.ndarray | None = None,
            extra: np.ndarray | None = None) -> np.ndarray:
    yy, xx, cx = anatomy["yy"], anatomy["xx"], anatomy["cx"]
    density = np.where(anatomy["body"], 0.55, 0.02)
    density += 0.08 * _smooth_noise(rng, (size, size), size / 16) * anatomy["body"]
    lung = anatomy["lungs"][0] | anatomy["lungs"][1]
    density = np.where(lung, 0.18, density)
    # vessel markings: smooth branching-like texture, strongest near the hila
    vessels = np.abs(_smooth_noise(rng, (size, size), size / 90)) > 1.6
    hilum = np.exp(-(((xx - cx) / 0.2) ** 2 + ((yy - 0.5) / 0.25) ** 2))
    markings = ndi.gaussian_filter(vessels.astype(float), size / 256) * (0.15 + 0.25 * hilum) * lung
    if remove_markings is not None:
        markings = np.where(remove_markings, 0.0, markings)
    density += markings
    density = np.where(anatomy["heart"], 0.7, density)
    density = np.where((np.abs(xx - cx - anatomy["tilt"] * (yy - 0.5)) < 0.045) & anatomy["body"], 0.8, density)
    # ribs: posterior arcs over the lungs
    spacing = rng.uniform(0.055, 0.065)
    for k in range(10):
        for side in (-1, 1):
            centre_y = 0.22 + k * spacing
            arc = centre_y + 0.12 * ((xx - cx) * side) ** 2 * 4 - 0.02 * side * (xx - cx)
            rib = (np.abs(yy - arc) < 0.008 + 0.002 * k / 10) & (side * (xx - cx) > 0.04) & (side * (xx - cx) < 0.33)
            density += 0.12 * rib * anatomy["body"]
    for side in (-1, 1):  # clavicles
        clavicle = (np.abs(yy - (0.2 - 0.1 * side * (xx - cx))) < 0.012) & (side * (xx - cx) > 0.02) & (
            side * (xx - cx) < 0.3)
        density += 0.2 * clavicle
    if extra is not None:
        density = density + extra
    gamma = rng.uniform(0.8, 1.2)
    image = np.clip(density, 0, 1) ** gamma
    image = ndi.gaussian_filter(image, size / 512) + rng.normal(0, 0.01, (size, size))
    return np.clip(image, 0, 1).astype(np.float32)


def chest_radiograph(seed: int, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 in [0, 1], body mask): one subject's normal radiograph, deterministic in (seed, size)."""
    rng = np.random.default_rng(seed)
    anatomy = _anatomy(rng, size)
    return _render(anatomy, np.random.default_rng(seed + 1), size), anatomy["body"]


def _lung_point(anatomy: dict, rng: np.random.Generator, margin: float) -> tuple[float, float, int]:
    side = int(rng.integers(2))
    lung = ndi.binary_erosion(anatomy["lungs"][side], iterations=max(1, int(margin * anatomy["yy"].shape[0])))
    if not lung.any():
        lung = anatomy["lungs"][side]
    ys, xs = np.nonzero(lung)
    i = int(rng.integers(len(ys)))
    n = anatomy["yy"].shape[0] - 1
    return ys[i] / n, xs[i] / n, side


def add_anomaly(seed: int, kind: str, size: int = 256, anomaly_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Subject ``seed``'s radiograph (the one :func:`chest_radiograph` draws) with one anomaly of ``kind``, and the
    boolean mask of the pixels it changes: (image, mask)."""
    if kind not in ANOMALY_KINDS:
        raise ValueError(f"kind must be one of {ANOMALY_KINDS}, got {kind!r}")
    anatomy = _anatomy(np.random.default_rng(seed), size)
    rng = np.random.default_rng([seed, anomaly_seed, ANOMALY_KINDS.index(kind)])
    yy, xx = anatomy["yy"], anatomy["xx"]
    extra, remove = np.zeros((size, size)), None
    if kind in ("nodule", "mass"):
        radius = rng.uniform(0.02, 0.04) if kind == "nodule" else rng.uniform(0.06, 0.1)
        cy, cx, _ = _lung_point(anatomy, rng, radius)
        shape = _ellipse(yy, xx, cy, cx, radius, radius * rng.uniform(0.8, 1.2), rng.uniform(0, np.pi))
        if kind == "mass":
            shape = shape * (1 + 0.25 * _smooth_noise(rng, (size, size), size / 40))
        extra = 0.35 * np.clip(1.5 - shape, 0, 1) ** 0.5 * (shape < 1.5)
        mask = shape < 1.2
    elif kind == "pneumothorax":
        side = int(rng.integers(2))
        lung = anatomy["lungs"][side]
        ys, xs = np.nonzero(lung)
        lateral = xs.min() if side == 0 else xs.max()
        depth = rng.uniform(0.25, 0.45) * (xs.max() - xs.min())
        apex = ys.min() + rng.uniform(0.3, 0.6) * (ys.max() - ys.min())
        region = lung & (np.abs(np.arange(size)[None, :] - lateral) < depth) & (np.arange(size)[:, None] < apex)
        pleura = region & ~ndi.binary_erosion(region, iterations=1)
        extra = np.where(region, -0.08, 0.0) + np.where(pleura, 0.15, 0.0)  # darker, no markings, a pleural line
        remove, mask = region, region
    elif kind == "effusion":
        side = int(rng.integers(2))
        lung = anatomy["lungs"][side]
        ys, xs = np.nonzero(lung)
        level = ys.max() - rng.uniform(0.2, 0.35) * (ys.max() - ys.min())
        centre = xs.mean()
        meniscus = level + 0.15 * size * ((np.arange(size)[None, :] - centre) / (xs.max() - xs.min())) ** 2 * -1
        region = lung & (np.arange(size)[:, None] > meniscus)
        extra = np.where(region, 0.45, 0.0)
        remove, mask = region, region
    else:  # foreign_object: a coin or a pin
        ys, xs = np.nonzero(ndi.binary_erosion(anatomy["body"], iterations=max(1, size // 16)))
        i = int(rng.integers(len(ys)))
        cy, cx = ys[i] / (size - 1), xs[i] / (size - 1)
        if rng.random() < 0.5:
            mask = _ellipse(yy, xx, cy, cx, 0.025, 0.025) < 1
        else:
            angle = rng.uniform(0, np.pi)
            along = (yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
            across = -(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
            mask = (np.abs(along) < 0.08) & (np.abs(across) < max(0.006, 1.5 / size))
        extra = np.where(mask, 1.0, 0.0)
    image = _render(anatomy, np.random.default_rng(seed + 1), size, remove_markings=remove, extra=extra)
    normal = _render(anatomy, np.random.default_rng(seed + 1), size)
    changed = np.abs(image - normal) > 0.02
    mask = np.asarray(mask, dtype=bool) & changed if (mask & changed).any() else np.asarray(mask, dtype=bool)
    return image, mask


def _png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.round(image * 65535).astype(np.uint16)).save(path)


def write_dicom_radiograph(path: str | Path, image: np.ndarray, window: tuple[float, float] | None = None,
                           pixel_spacing: tuple[float, float] = (0.7, 0.7), uid_seed: str = "") -> Path:
    """``image`` (row-major, [0, 1]) as a DX DICOM Part 10 file (For Presentation, MONOCHROME2, 12 bits stored),
    with WindowCenter/WindowWidth when ``window`` is given; UIDs derived from ``uid_seed`` and the path."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path = Path(path)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed, path.name, "sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed, path.name, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, path.name, "series"])
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "DX", "MONOCHROME2", 1
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [float(pixel_spacing[0]), float(pixel_spacing[1])]
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = float(window[0]), float(window[1])
    ds.PixelData = np.round(np.clip(image, 0, 1) * 4095).astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_xray_dataset(output_dir: str | Path, n_train: int = 20, n_toy: int = 10, seed: int = 0, size: int = 256,
                       dicom: bool = False) -> dict:
    """The layout of the module docstring under ``output_dir/xray``; returns its folders and cases."""
    root = Path(output_dir) / "xray"
    train, toy = root / "xray_train", root / "toy"
    pixel, sample = root / "toy_label" / "pixel", root / "toy_label" / "sample"
    for folder in (train, toy, pixel, sample):
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        _png(train / f"x_{i:04d}.png", chest_radiograph(_TRAIN_SEED + 1000 * seed + i, size)[0])
    cases = {}
    for i in range(n_toy):
        subject = _TOY_SEED + 1000 * seed + i
        anomalous = i >= n_toy // 2
        kind = ANOMALY_KINDS[(i - n_toy // 2) % len(ANOMALY_KINDS)] if anomalous else "normal"
        if anomalous:
            image, mask = add_anomaly(subject, kind, size, anomaly_seed=seed)
        else:
            image, mask = chest_radiograph(subject, size)[0], np.zeros((size, size), bool)
        stem = f"toy_{i:04d}"
        _png(toy / f"{stem}.png", image)
        if dicom:
            write_dicom_radiograph(root / "toy_dicom" / f"{stem}.dcm", image, window=(2048, 4096), uid_seed=str(seed))
        nib.save(nib.Nifti1Image(mask.T.astype(np.uint8), np.eye(4)), pixel / f"{stem}.nii.gz")
        (sample / f"{stem}.nii.gz.txt").write_text(f"{int(anomalous)}\n")
        cases[f"{stem}.nii.gz"] = {"label": int(anomalous), "kinds": [kind]}
    (root / "toy_label" / "anomalies.json").write_text(json.dumps({"cases": cases}, indent=1))
    return {"root": str(root), "train": n_train, "toy": n_toy, "anomalous": sum(c["label"] for c in cases.values()),
            "cases": cases}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--train", type=int, default=20, help="normal training radiographs")
    parser.add_argument("--toy", type=int, default=10, help="test cases, half normal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256, help="side of every image (pixels)")
    parser.add_argument("--dicom", action="store_true", help="also the toy cases as DICOM files")
    args = parser.parse_args(argv)
    written = write_xray_dataset(args.output_dir, args.train, args.toy, args.seed, args.size, args.dicom)
    print(f"xray: {written['train']} training images, {written['toy']} toy cases ({written['anomalous']} anomalous) "
          f"in {written['root']}")
    return written


if __name__ == "__main__":
    main()
