"""A self-contained HTML report of anomaly predictions for people who read scans: the worklist sorted by score,
three orthogonal views per case (one per 2D image), and, where labels exist, MOOD's AP and AUROC.

Run (``make report IN=... PRED=... [OUT=report]``)::

    PYTHONPATH=bundle:. python -m tools.report --input IN --pred PRED [--output_dir OUT] [--title T] \\
        [--modality auto|ct|mr] [--window LOW,HIGH] [--max_views N] [--scores_csv CSV] [--cases_dir_name toy]

``IN`` is either a plain folder of scans (``*.nii.gz``, ``*.nii``, or 2D images: see below; no labels), or a
MOOD-layout dataset folder as :mod:`tools.toy_data` writes it (``toy/``, ``toy_label/pixel``, ``toy_label/sample``,
optionally ``toy_label/anomalies.json``), or the scans folder of one (``DATA/toy`` next to ``DATA/toy_label``).
``PRED`` is the inference output folder: the pixel map ``<name>`` (NIfTI on the input grid), the sample score
``<name>.txt`` and, when the inference wrote one, the worklist ``scores.csv`` (columns ``name, source, series_uid,
status, reason, sample_score, flag_fpr, sample_threshold, flagged, map_max, max_x_mm, max_y_mm, max_z_mm,
voxel_fpr, voxel_threshold, volume_above_ml, seconds``; extra columns are ignored). With ``scores.csv`` the report
shows its thresholds, flags and failures; without it, it works from the ``.txt`` and map files alone (no
thresholds, said in one line). ``--pixel_dir`` / ``--sample_dir`` (and the old ``--data_dir``) are still accepted.

``OUT/report.html`` (one file: PNGs as base64 data URIs, the colour bars as inline SVG, no scripts, no external
references) holds:

- a summary table: folders, case counts (ok / failed / missing prediction), the operating point (sample threshold
  at its false-positive rate on normal scans, voxel threshold), the display window, run time;
- the worklist: every case by sample score (highest first; cases without a score, then failed cases, at the end),
  with the flag (highlighted), status and reason, the map's maximum and its location in scanner coordinates (RAS
  mm, as NIfTI affines give them), the volume above the voxel threshold, and with labels the label and anomaly kinds;
- with labels: AP and AUROC at pixel level (pooled over all voxels, from float16 bin counts as
  :mod:`scripts.evaluate` does) and at sample level, overall and per anomaly kind (that kind's cases plus all normal
  cases), and the precision-recall curves. Predictions are read as :func:`scripts.evaluate.evaluate` reads them
  (clipped to [0, 1], NaN as 0, a missing or mis-shaped prediction as zeros), so the overall numbers equal its;
- per case (the ``--max_views`` highest-ranked): sagittal, coronal and axial slices through the map's maximum,
  rendered at about 340 px (never less than 300 px wide), reoriented to RAS for display (nibabel's
  ``io_orientation``) and shown in the radiological convention (patient's right on the viewer's left, anterior or
  superior at the top) with orientation letters on every edge; the map overlaid semi-transparently (inferno, values
  below 0.05 not drawn) with a colour bar on which the voxel threshold is marked when known, the region above that
  threshold outlined in green, the ground truth outlined in cyan, yellow ticks at the maximum on the borders.

2D images (chest radiographs, ``bundle/configs/xray.yaml``): when the scans folder holds no NIfTI scan but PNG,
JPEG or DICOM files (by suffix, or DICOM by content), and no worklist row names a folder (a DICOM series, whose files
are slices), the cases are its images, named as the bundle names their outputs
(:func:`scripts.io.radiographs.list_radiograph_inputs`: ``a.dcm`` -> ``a.nii.gz``, ``a.png`` -> ``a_png.nii.gz`` beside
it), so maps, scores, ``scores.csv`` rows and MOOD-like labels (``toy_label/pixel/<name>``, 2D NIfTI) match by name.
A folder with NIfTI scans is read as volumes: 2D images beside them are left out (counted in the summary). Each 2D
case gets one view instead of three: the whole image as the bundle preprocesses it (its reader, the DICOM window,
histogram equalisation onto [-1, 1], shown -1 black to 1 white), rows top to bottom (the (columns, rows) arrays of
MONAI's readers and of the maps transposed back), its longer side about 340 px and never narrower than 300 px, the
map, outlines and colour bar as for volumes, and no orientation letters (a radiograph's pixel grid does not state
the patient's axes). The bundle's ``<stem>_overlay.png`` files are not used.

A DICOM series (a worklist row whose ``source`` is a folder, with its ``series_uid``) is read with pydicom onto
the grid of its map, as the inference writes it (voxel (i, j, k): column i, row j of the k-th slice in
InstanceNumber order; RescaleSlope/Intercept applied), and shown with the map's affine.

Display window: CT in Hounsfield units (minimum below -500) in the soft-tissue window W 400 / L 40 HU. MOOD ships
its abdominal CT scaled to [0, 1] and does not publish the mapping (the organisers declined to give it,
github.com/MIC-DKFZ/mood issue #2), so CT outside HU falls back to a percentile window (1st-99th percentile of the
voxels above the scan's minimum); MR uses the 0.5th-99.5th percentile of those voxels. ``--modality auto`` takes CT
for a dataset folder named ``abdom``, MR for ``brain``, else CT when the scan's minimum is below -500 HU;
``--window LOW,HIGH`` sets the window in the scans' own units.

Errors in the inputs (``IN`` or ``PRED`` missing, no scans, an unreadable ``scores.csv``) print one line naming the
folder and the problem and exit with status 2. A missing or failed case is a row of the worklist, never a crash.
``OUT/report.json`` holds the numbers. The last printed line is ``report: <path of the HTML>``.
:mod:`tools.report_screenshot` (``make report-check``) checks the page in headless Chromium.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage as ndi

# scripts.evaluate (torch, MONAI through the scripts package), sklearn and pyplot are imported where they are
# needed: a report without labels never loads them (about 10 s on 2 cores).

__all__ = ["MIN_PANEL_WIDTH", "PANEL_SIDE", "STYLE", "THRESHOLD_COLOUR", "ReportError", "display_window", "fmt_metric",
           "main", "pr_curve_from_counts", "read_scores_csv", "write_report"]

DEFAULT_TITLE = "Anomaly detection report"
WORKLIST_NAME = "scores.csv"
SCAN_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")  # 2D images (scripts.radiographs), DICOM also by content
PANEL_SIDE = 340  # px: the longest side of a case's slices (one mm-to-px scale for its three views)
MIN_PANEL_WIDTH = 300  # px: no slice is shown narrower
DEFAULT_MAX_VIEWS = 40  # cases with views (the highest-ranked); a view is ~3 PNGs of 50-150 kB
OVERLAY_ALPHA, OVERLAY_FLOOR = 0.5, 0.05  # the map is drawn semi-transparently where it is >= the floor
CT_SOFT_TISSUE_HU = (40.0, 400.0)  # level, width: the usual abdominal soft-tissue window
HU_MINIMUM = -500.0  # a scan whose minimum lies below this is taken to be in Hounsfield units (air is -1000)
PERCENTILES = {"ct": (1.0, 99.0), "mr": (0.5, 99.5)}
PERCENTILE_VOXELS = 2_000_000  # window percentiles from a strided subsample of at most about this many voxels
# (name, fixed RAS axis, RAS axis along the columns, RAS axis along the rows), radiological display
VIEWS = (("sagittal", 0, 1, 2), ("coronal", 1, 0, 2), ("axial", 2, 0, 1))
POSITIVE, NEGATIVE = "RAS", "LPI"  # the letter at the positive / negative end of each RAS axis
WORLD_AXIS = "xyz"
DASH, DOT = "\u2014", " \u00b7 "
_LUT = (matplotlib.colormaps["inferno"](np.linspace(0.15, 1.0, 256))[:, :3] * 255).astype(np.uint8)
GT_COLOUR, THRESHOLD_COLOUR, TICK_COLOUR = (0, 255, 255), (0, 255, 0), (255, 215, 0)  # cyan, lime, gold


class ReportError(Exception):
    """A problem with the report's inputs, printed as one line by :func:`main`."""


# ------------------------------------------------------------------------------------------------- numbers
def fmt_metric(value: float | None) -> str:
    """How the report prints AP and AUROC (4 decimals; an em dash where undefined)."""
    return "\u2014" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _num(value: float | None, digits: int) -> str:
    return "\u2014" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _pct(rate: float | None) -> str:
    """A rate as a percentage: 0.05 -> '5 %', 0.001 -> '0.1 %'."""
    return "\u2014" if rate is None or not math.isfinite(rate) else f"{rate * 100:.4g} %"


def _score_metrics(labels: Sequence[int], scores: Sequence[float]) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score

    labels, scores = np.asarray(labels, dtype=int), np.asarray(scores, dtype=np.float64)
    ap = auroc = None
    if labels.sum() > 0:
        ap = float(average_precision_score(labels, scores))
    if 0 < labels.sum() < labels.size:
        auroc = float(roc_auc_score(labels, scores))
    return {"average_precision": ap, "auroc": auroc, "n_positives": int(labels.sum()),
            "n_negatives": int(labels.size - labels.sum())}


def pr_curve_from_counts(positives: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every threshold of the score bins (bins in increasing score order), as sklearn's
    ``precision_recall_curve`` on the individual items, without the items."""
    tp = np.cumsum(positives[::-1].astype(np.float64))
    fp = np.cumsum(negatives[::-1].astype(np.float64))
    keep = (positives[::-1] + negatives[::-1]) > 0
    tp, fp = tp[keep], fp[keep]
    if tp.size == 0 or tp[-1] == 0:
        return np.zeros(0), np.zeros(0)
    return np.concatenate([[0.0], tp / tp[-1]]), np.concatenate([[1.0], tp / np.maximum(tp + fp, 1.0)])


# ------------------------------------------------------------------------------------------------ inputs
def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is None or math.isfinite(value) else None


def read_scores_csv(path: str | os.PathLike) -> list[dict]:
    """The rows of an inference worklist (``scores.csv``) with numbers parsed (None where empty or unreadable),
    ``flagged`` as True / False / None and ``location_mm`` as 3 floats or None. Unknown columns are ignored."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            fields = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ReportError(f"{path}: unreadable worklist ({err})") from None
    if "name" not in fields:
        raise ReportError(f"{path}: no 'name' column (header: {', '.join(fields) or 'empty'})")
    out = []
    for row in rows:
        get = lambda key, row=row: (row.get(key) or "").strip()  # noqa: E731
        if not get("name"):
            continue
        location = [_float(get(f"max_{a}_mm")) for a in WORLD_AXIS]
        flagged = get("flagged").lower()
        out.append({
            "name": get("name"), "source": get("source"), "series_uid": get("series_uid"),
            "status": get("status").lower() or "ok", "reason": get("reason"),
            "score": _float(get("sample_score")), "flag_fpr": _float(get("flag_fpr")),
            "sample_threshold": _float(get("sample_threshold")),
            "flagged": True if flagged in ("yes", "true", "1") else False if flagged in ("no", "false", "0") else None,
            "map_max": _float(get("map_max")), "location_mm": location if None not in location else None,
            "voxel_fpr": _float(get("voxel_fpr")), "voxel_threshold": _float(get("voxel_threshold")),
            "volume_above_ml": _float(get("volume_above_ml")), "seconds": _float(get("seconds")),
        })
    return out


def _is_scan(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(SCAN_SUFFIXES)


def _folder(path: str | os.PathLike | None, what: str) -> Path | None:
    if path is None or str(path) == "":
        return None
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{what} folder {path} does not exist")
    if not path.is_dir():
        raise ReportError(f"{what} folder {path} is not a folder")
    return path


def _layout(input_dir: Path, cases_dir_name: str) -> dict:
    """Where the scans and (if any) the labels are: ``input_dir/<cases>`` + ``input_dir/<cases>_label`` (MOOD
    layout), ``input_dir`` + ``input_dir/../<name>_label`` (the scans folder of one), or ``input_dir`` alone."""
    if (input_dir / cases_dir_name).is_dir():
        scans, labels = input_dir / cases_dir_name, input_dir / f"{cases_dir_name}_label"
    else:
        scans, labels = input_dir, input_dir.parent / f"{input_dir.name}_label"
    pixel, sample = labels / "pixel", labels / "sample"
    return {"input": input_dir, "scans": scans, "label_root": labels if pixel.is_dir() or sample.is_dir() else None,
            "pixel_labels": pixel if pixel.is_dir() else None, "sample_labels": sample if sample.is_dir() else None}


def _read_score(path: Path) -> tuple[float | None, str]:
    if not path.is_file():
        return None, "missing"
    try:
        with open(path) as handle:
            value = float(handle.readline().split()[0])
    except Exception as err:
        return None, f"unreadable score file {path.name}: {err}"
    return (None, f"score in {path.name} is NaN") if math.isnan(value) else (value, "ok")


def _kinds(label_root: Path | None) -> dict[str, list[str]]:
    path = label_root / "anomalies.json" if label_root is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {name: list(info.get("kinds") or []) for name, info in meta.get("cases", {}).items()}


def _new_case(name: str, scan: Path | None, **row) -> dict:
    case = {"name": name, "source": "", "series_uid": "", "status": "ok", "reason": "", "score": None,
            "flag_fpr": None, "sample_threshold": None, "flagged": None, "map_max": None, "location_mm": None,
            "voxel_fpr": None, "voxel_threshold": None, "volume_above_ml": None, "seconds": None, "notes": []}
    case.update(row)
    case["scan_path"] = scan
    return case


def _looks_like_image(path: Path) -> bool:
    """Cheaply, whether ``path`` may be a 2D image of the bundle's (PNG, JPEG, DICOM by suffix or by its 'DICM'
    preamble); :func:`scripts.io.radiographs.list_radiograph_inputs` decides (it imports torch and MONAI)."""
    if not path.is_file() or path.name.startswith("."):
        return False
    if path.name.lower().endswith(IMAGE_SUFFIXES):
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _inputs(scans_dir: Path, row_scans: Sequence[Path]) -> tuple[str, list[tuple[str, Path]], int]:
    """(kind, [(case name, file)], images not shown) of the scans folder: ``"volumes"`` when it holds NIfTI scans
    (any 2D images beside them are left out and counted) or a worklist row names a folder (a DICOM series: its
    files are slices, not radiographs); else ``"images"`` when it holds 2D images, named as the bundle names their
    outputs (:func:`scripts.io.radiographs.list_radiograph_inputs`)."""
    entries = sorted(scans_dir.iterdir()) if scans_dir.is_dir() else []
    files = [p for p in entries if _is_scan(p)]
    images = [p for p in entries if not _is_scan(p) and _looks_like_image(p)]
    if files or not images or any(scan.is_dir() for scan in row_scans):
        return "volumes", [(scan.name, scan) for scan in files], len(images) if files else 0
    from scripts.io.radiographs import list_radiograph_inputs

    try:
        items = list_radiograph_inputs(scans_dir)
    except ValueError:  # only files named like images that are none (e.g. a DICOMDIR-less folder of odd files)
        return "volumes", [], 0
    return "images", [(item["name"], Path(item["image_path"])) for item in items], 0


def _collect(layout: dict, pixel_dir: Path | None, sample_dir: Path | None, rows: list[dict] | None) -> list[dict]:
    """One case per worklist row, per scan not in the worklist and per label file of neither (processing
    order: the worklist's, then the folder's). Sets ``layout["kind"]`` (volumes or images, see :func:`_inputs`)
    and ``layout["images_left_out"]``."""
    scans_dir, root = layout["scans"], layout["input"]
    found = []
    for row in rows or []:
        scan = None
        for base in (scans_dir, root):
            candidate = base / (row["source"] or row["name"])
            if candidate.exists():  # a file, or a DICOM series' folder (source "." for IN itself)
                scan = candidate
                break
        found.append(scan)
    kind, named, left_out = _inputs(scans_dir, [scan for scan in found if scan is not None])
    layout["kind"], layout["images_left_out"] = kind, left_out
    by_name = dict(named)
    cases, seen_scans, seen_names = [], set(), set()
    for row, scan in zip(rows or [], found):
        if scan is None and kind == "images":  # a row without its file's name: the bundle's output name
            scan = by_name.get(row["name"])
        cases.append(_new_case(row["name"], scan, **{k: v for k, v in row.items() if k != "name"},
                               from_worklist=True))
        seen_names.add(row["name"])
        if scan is not None:
            seen_scans.add(scan.resolve())
    for name, scan in named:
        if scan.resolve() in seen_scans or name in seen_names:
            continue
        cases.append(_new_case(name, scan, source=scan.name, from_worklist=False))
        seen_names.add(name)
    if layout["pixel_labels"] is not None or layout["sample_labels"] is not None:
        names = set()
        if layout["pixel_labels"] is not None:
            names |= {p.name for p in layout["pixel_labels"].iterdir() if p.is_file() and not p.name.startswith(".")}
        if layout["sample_labels"] is not None:
            names |= {p.name[:-4] for p in layout["sample_labels"].iterdir() if p.name.endswith(".txt")}
        for name in sorted(names - seen_names):
            cases.append(_new_case(name, None, source=name, from_worklist=False))
    for case in cases:
        name = case["name"]
        case["map_path"] = pixel_dir / name if pixel_dir is not None and (pixel_dir / name).is_file() else None
        if not case["from_worklist"] or case["score"] is None:
            score, status = _read_score(sample_dir / f"{name}.txt") if sample_dir is not None else (None, "missing")
            if score is not None:
                case["score"] = score
            elif status != "missing" and case["status"] == "ok":
                case["notes"].append(status)
        if case["status"] == "ok" and case["map_path"] is None and case["score"] is None:
            case["status"] = "missing"
            case["reason"] = "no map and no score file"
        elif case["status"] == "ok" and case["map_path"] is None and pixel_dir is not None:
            case["notes"].append(f"no map {name} in the predictions folder")
    return cases


def _rank(cases: list[dict]) -> list[dict]:
    """The worklist order: scored cases by score (highest first), then cases with a map but no score (by map
    maximum), then missing predictions, then failed cases; ties keep the processing order."""
    def key(item):
        index, case = item
        group = {"ok": 0, "missing": 2}.get(case["status"], 3)
        if group == 0 and case["score"] is None:
            group = 1
        value = case["score"] if group == 0 else (case["map_max"] or 0.0) if group == 1 else 0.0
        return group, -value, index
    ordered = [c for _, c in sorted(enumerate(cases), key=key)]
    rank = 0
    for case in ordered:
        case["rank"] = None
        if case["status"] == "ok" and (case["score"] is not None or case["map_max"] is not None):
            rank += 1
            case["rank"] = rank
    return ordered


# --------------------------------------------------------------------------------------------- volumes
def _as_volume(arr: np.ndarray) -> np.ndarray:
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"a {arr.ndim}-D image, not a 3-D volume")
    return arr


def _load_scan(path: Path, series_uid: str = "", grid_affine: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(volume, affine) of a NIfTI file, or of a DICOM series in a folder (see
    :func:`_load_dicom_series`; its affine is ``grid_affine``, the map's)."""
    if path.is_dir():
        if grid_affine is None:
            raise ValueError("a DICOM series without a map (the map gives its grid's orientation)")
        return _load_dicom_series(path, series_uid), np.asarray(grid_affine, dtype=np.float64)
    if not _is_scan(path):
        from scripts.io.radiographs import read_for_display

        return read_for_display(path)
    img = nib.load(str(path))  # the file's own data type (int16 CT stays int16: half the memory of float32)
    return _as_volume(np.asanyarray(img.dataobj)), np.asarray(img.affine, dtype=np.float64)


def _view_2d(image: np.ndarray | None, shape: tuple[int, int], prediction: np.ndarray | None,
             label: np.ndarray | None, voxel_threshold: float | None) -> dict:
    """The one view of a 2D case: arrays (columns, rows) shown as the picture (rows top to bottom), its longer side
    :data:`PANEL_SIDE` px and never narrower than :data:`MIN_PANEL_WIDTH` (one scale for both sides: the picture's
    aspect), the map blended and outlined as in the 3D views. A radiograph's pixel grid does not state the patient's
    axes, so no orientation letters."""
    columns, rows = shape
    scale = max(PANEL_SIDE / max(columns, rows), MIN_PANEL_WIDTH / columns)
    width, height = max(1, round(columns * scale)), max(1, round(rows * scale))
    size = (width, height)
    grey = (np.clip((_resize(image.T, size) + 1) / 2, 0, 1) if image is not None
            else np.zeros((height, width), dtype=np.float32))
    rgb = _composite(grey, None if prediction is None else _resize(prediction.T, size),
                     None if label is None else _resize(label.T.astype(np.uint8), size, nearest=True), voxel_threshold)
    caption = (f"image, {columns} x {rows} pixels (equalised as the bundle sees it)" if image is not None
               else f"map only (image not shown), {columns} x {rows} pixels")
    if prediction is not None:
        column, row = np.unravel_index(int(np.argmax(prediction)), prediction.shape)
        caption += f"; map maximum at column {column + 1}, row {row + 1} (from the top left)"
    return {"name": "image", "uri": _data_uri(_png(rgb)), "width": width, "height": height, "letters": {},
            "caption": caption}


def _load_dicom_series(folder: Path, series_uid: str = "") -> np.ndarray:
    """The DICOM series ``series_uid`` (any, if empty) under ``folder`` as the inference's map grid holds it:
    voxel (i, j, k) is column i, row j of the k-th slice in InstanceNumber order, in modality units
    (RescaleSlope and RescaleIntercept applied: HU for CT; DICOM PS3.3 C.7.6.2.1.1 and C.11.1.1.2)."""
    import pydicom

    files = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True,
                                     specific_tags=["SeriesInstanceUID", "InstanceNumber"])
        except Exception:
            continue
        if "SeriesInstanceUID" not in header or (series_uid and str(header.SeriesInstanceUID) != series_uid):
            continue
        files.append((int(header.get("InstanceNumber", 0) or 0), path))
    if not files:
        raise ValueError(f"no DICOM files of series {series_uid or '(any)'} under {folder}")
    slices = []
    for _, path in sorted(files, key=lambda item: item[0]):
        ds = pydicom.dcmread(path)
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        slices.append(np.asarray(ds.pixel_array, dtype=np.float32).T * slope + intercept)  # (columns, rows)
    return np.stack(slices, axis=-1)


def _load_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The anomaly map as float32 in [0, 1] (NaN as 0), and its affine."""
    img = nib.load(str(path))
    values = np.asarray(img.dataobj, dtype=np.float32)
    values = values if values.ndim == 2 else _as_volume(values)  # a 2D image's map, or a volume's
    values = np.nan_to_num(values, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
    np.clip(values, 0.0, 1.0, out=values)
    return values, np.asarray(img.affine, dtype=np.float64)


def _zero_counts(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scripts.evaluate import F16_BINS

    pos, neg = np.zeros(F16_BINS, dtype=np.int64), np.zeros(F16_BINS, dtype=np.int64)
    pos[0] = int(np.count_nonzero(label))
    neg[0] = label.size - pos[0]
    return pos, neg


def _subsample(volume: np.ndarray) -> np.ndarray:
    step = max(1, math.ceil((volume.size / PERCENTILE_VOXELS) ** (1 / 3)))
    return volume[::step, ::step, ::step]


def _dataset_modality(path: Path) -> str | None:
    for part in reversed(path.resolve().parts):
        low = part.lower()
        if "abdom" in low:
            return "ct"
        if "brain" in low:
            return "mr"
    return None


def display_window(scan: np.ndarray, modality: str = "auto", window: tuple[float, float] | None = None,
                   hint: str | None = None) -> tuple[float, float, str]:
    """(low, high, description) of the grey-value window for ``scan``: ``window`` when given; CT in HU
    (minimum below -500): W 400 / L 40 HU; otherwise a percentile window of the voxels above the minimum (CT:
    1st-99th, MR: 0.5th-99.5th). ``modality`` auto: ``hint`` (from the folder name), else CT when in HU."""
    if window is not None:
        return float(window[0]), float(window[1]), f"window {window[0]:g} to {window[1]:g} (--window)"
    sample = _subsample(scan)
    minimum = float(sample.min()) if sample.size else 0.0
    in_hu = minimum < HU_MINIMUM
    kind = modality if modality in ("ct", "mr") else hint or ("ct" if in_hu else "mr")
    if kind == "ct" and in_hu:
        level, width = CT_SOFT_TISSUE_HU
        return level - width / 2, level + width / 2, f"CT soft-tissue window W {width:g} / L {level:g} HU"
    body = sample[sample > minimum]
    body = body if body.size else sample.reshape(-1)
    q = PERCENTILES[kind]
    lo, hi = (float(v) for v in np.percentile(body, q)) if body.size else (0.0, 1.0)
    if not hi > lo:  # a (nearly) constant body: the whole range
        lo, hi = minimum, max(float(sample.max()), minimum + 1e-6)
    if kind == "ct":
        text = (f"CT not in HU (minimum {minimum:.3g}): percentile window {q[0]:g}-{q[1]:g} % of the voxels above "
                "the minimum (MOOD does not publish its HU scaling)")
    else:
        text = f"MR: percentile window {q[0]:g}-{q[1]:g} % of the voxels above the minimum"
    return lo, hi, text


# ------------------------------------------------------------------------------------------------ images
def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _resize(plane: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """``plane`` (rows, columns) resized to ``size`` = (width, height); bilinear (antialiased when shrinking)."""
    if nearest:
        img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.uint8))
        return np.asarray(img.resize(size, Image.Resampling.NEAREST)) > 0
    img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))
    return np.asarray(img.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def _outline(mask: np.ndarray) -> np.ndarray:
    """A 2-px outline of ``mask``: one pixel inside its border and one outside."""
    if not mask.any():
        return mask
    return ndi.binary_dilation(mask) & ~ndi.binary_erosion(mask, border_value=1)


def _composite(grey: np.ndarray, heat: np.ndarray | None, truth: np.ndarray | None,
               voxel_threshold: float | None) -> np.ndarray:
    """One displayed panel (rows, columns, RGB): ``grey`` in [0, 1], the map ``heat`` blended where it reaches
    :data:`OVERLAY_FLOOR`, the region above ``voxel_threshold`` outlined green, the label ``truth`` outlined cyan."""
    rgb = np.repeat((grey * 255.0 + 0.5).astype(np.uint8)[..., None], 3, axis=2)
    if heat is not None:
        shown = heat >= OVERLAY_FLOOR
        colour = _LUT[np.clip((heat * 255).astype(np.int64), 0, 255)]
        rgb[shown] = (rgb[shown] * (1 - OVERLAY_ALPHA) + colour[shown] * OVERLAY_ALPHA + 0.5).astype(np.uint8)
        if voxel_threshold is not None:
            rgb[_outline(heat >= voxel_threshold)] = THRESHOLD_COLOUR
    if truth is not None:
        rgb[_outline(truth)] = GT_COLOUR
    return rgb


def _plane(volume: np.ndarray, fixed: int, index: int) -> np.ndarray:
    """The slice of a RAS volume at ``index`` along ``fixed`` as displayed (rows, columns): the remaining lower
    axis along the columns, its positive end (R or A) on the left; the higher one along the rows, positive end
    (A or S) at the top."""
    where = [slice(None)] * 3
    where[fixed] = int(index)
    return np.asarray(volume[tuple(where)])[::-1, ::-1].T  # basic indexing: a view, never a copy of the volume


def _views(scan: np.ndarray | None, affine: np.ndarray, shape: tuple[int, ...], prediction: np.ndarray | None,
           label: np.ndarray | None, point: Sequence[int], window: tuple[float, float],
           voxel_threshold: float | None, mark: bool = True) -> list[dict]:
    """The three views through voxel ``point`` (array indices) of arrays on one grid with ``affine``; ``mark``:
    ticks at the point on the borders."""
    ornt = nib.orientations.io_orientation(affine)
    to_ras = lambda a: None if a is None else nib.orientations.apply_orientation(a, ornt)  # noqa: E731
    scan_r, pred_r, label_r = to_ras(scan), to_ras(prediction), to_ras(label)
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    n_ras, spacing, p_ras = [0] * 3, [1.0] * 3, [0] * 3
    for axis, (out_axis, flip) in enumerate(ornt):
        out_axis = int(out_axis)
        n_ras[out_axis], spacing[out_axis] = int(shape[axis]), float(zooms[axis]) or 1.0
        p_ras[out_axis] = int(point[axis]) if flip > 0 else int(shape[axis]) - 1 - int(point[axis])
    world = (np.asarray(affine) @ np.array([*map(float, point), 1.0]))[:3]
    extent = [n * s for n, s in zip(n_ras, spacing)]
    scale = PANEL_SIDE / max(extent)
    lo, hi = window
    out = []
    for name, fixed, col, row in VIEWS:
        width, height = max(1, round(extent[col] * scale)), max(1, round(extent[row] * scale))
        if width < MIN_PANEL_WIDTH:
            height, width = max(1, round(height * MIN_PANEL_WIDTH / width)), MIN_PANEL_WIDTH
        size = (width, height)
        if scan_r is not None:
            grey = np.clip((_resize(_plane(scan_r, fixed, p_ras[fixed]), size) - lo) / (hi - lo), 0.0, 1.0)
        else:
            grey = np.zeros((height, width), dtype=np.float32)
        heat = None if pred_r is None else _resize(_plane(pred_r, fixed, p_ras[fixed]), size)
        truth = (None if label_r is None
                 else _resize(_plane(label_r, fixed, p_ras[fixed]).astype(np.uint8), size, nearest=True))
        rgb = _composite(grey, heat, truth, voxel_threshold)
        # the maximum: ticks on the four borders at its column and row
        c = min(width - 1, int((n_ras[col] - 1 - p_ras[col] + 0.5) * width / n_ras[col]))
        r = min(height - 1, int((n_ras[row] - 1 - p_ras[row] + 0.5) * height / n_ras[row]))
        tick = max(6, min(width, height) // 30)
        cs, rs = slice(max(0, c - 1), c + 2), slice(max(0, r - 1), r + 2)
        for index in ((slice(0, tick), cs), (slice(height - tick, height), cs), (rs, slice(0, tick)),
                      (rs, slice(width - tick, width))) if mark else ():
            rgb[index] = TICK_COLOUR
        out.append({"name": name, "uri": _data_uri(_png(rgb)), "width": width, "height": height,
                    "letters": {"l": POSITIVE[col], "r": NEGATIVE[col], "t": POSITIVE[row], "b": NEGATIVE[row]},
                    "caption": f"{name}, {WORLD_AXIS[fixed]} = {world[fixed]:.1f} mm "
                               f"(slice {p_ras[fixed] + 1} of {n_ras[fixed]})"})
    return out


def _colourbar_svg(height: int, threshold: float | None, ident: str) -> str:
    """A vertical colour bar of the overlay (0 at the bottom, 1 at the top), the voxel threshold marked."""
    top, bar_w, x0 = 9, 18, 2
    bar_h = max(40, height - 2 * top)
    stops = "".join(f"<stop offset='{o:.2f}' stop-color='#{''.join(f'{v:02x}' for v in _LUT[int((1 - o) * 255)])}'/>"
                    for o in np.linspace(0.0, 1.0, 11))
    parts = [f"<svg class='colourbar' width='140' height='{bar_h + 2 * top}' role='img' "
             f"aria-label='colour bar of the anomaly map'><defs><linearGradient id='{ident}' x1='0' y1='0' x2='0' "
             f"y2='1'>{stops}</linearGradient></defs>",
             f"<rect x='{x0}' y='{top}' width='{bar_w}' height='{bar_h}' fill='url(#{ident})' stroke='#444'/>"]
    floor_y = top + bar_h * (1 - OVERLAY_FLOOR)
    parts.append(f"<rect x='{x0}' y='{floor_y:.1f}' width='{bar_w}' height='{top + bar_h - floor_y:.1f}' "
                 "fill='#bbb'/>")
    for value in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + bar_h * (1 - value)
        parts.append(f"<line x1='{x0 + bar_w}' y1='{y:.1f}' x2='{x0 + bar_w + 5}' y2='{y:.1f}' stroke='#444'/>"
                     f"<text x='{x0 + bar_w + 8}' y='{y + 4.5:.1f}' font-size='13'>{value:g}</text>")
    if threshold is not None and math.isfinite(threshold):
        y = top + bar_h * (1 - min(max(threshold, 0.0), 1.0))
        parts.append(f"<line x1='0' y1='{y:.1f}' x2='{x0 + bar_w + 2}' y2='{y:.1f}' stroke='#000' "
                     "stroke-width='3'/>"
                     f"<line x1='0' y1='{y:.1f}' x2='{x0 + bar_w + 2}' y2='{y:.1f}' stroke='#fff' stroke-width='1'/>"
                     f"<text x='{x0 + bar_w + 42}' y='{y + 4.5:.1f}' font-size='13' font-weight='bold'>"
                     f"thr {threshold:.3f}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _pr_figure(pixel_curve, sample_curve, pixel_ap, sample_ap) -> str:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0))
    for ax, curve, ap, name in ((axes[0], pixel_curve, pixel_ap, "pixel level (pooled voxels)"),
                                (axes[1], sample_curve, sample_ap, "sample level (cases)")):
        if curve is not None and curve[0].size:
            ax.step(curve[0], curve[1], where="post", color="tab:blue")
            ax.set_title(f"{name}: AP {fmt_metric(ap)}", fontsize=12)
        else:
            ax.set_title(f"{name}: no data", fontsize=12)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall", fontsize=11)
        ax.set_ylabel("precision", fontsize=11)
        ax.tick_params(labelsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return _data_uri(buf.getvalue())


# ------------------------------------------------------------------------------------------------- report
def write_report(data_dir: str | os.PathLike, pixel_dir: str | os.PathLike | None = None,
                 sample_dir: str | os.PathLike | None = None, output_dir: str | os.PathLike = "report",
                 title: str = DEFAULT_TITLE, seconds_per_case: float | None = None, cases_dir_name: str = "toy",
                 modality: str = "auto", window: tuple[float, float] | None = None,
                 max_views: int = DEFAULT_MAX_VIEWS, scores_csv: str | os.PathLike | None = None) -> Path:
    """Write ``output_dir/report.html`` (self-contained) and ``report.json``; return the HTML's path.
    ``data_dir`` is the input folder (scans, or a MOOD-layout dataset); ``pixel_dir`` / ``sample_dir`` the
    predictions (usually one folder); ``scores_csv`` the worklist (default: ``scores.csv`` in either). Raises
    :class:`ReportError` for unusable inputs. See the module docstring."""
    if modality not in ("auto", "ct", "mr"):
        raise ReportError(f"--modality must be auto, ct or mr, got {modality!r}")
    input_dir = _folder(data_dir, "input")
    pixel_dir, sample_dir = _folder(pixel_dir, "predictions"), _folder(sample_dir, "predictions")
    if pixel_dir is None and sample_dir is None:
        raise ReportError("no predictions folder given (--pred)")
    layout = _layout(input_dir, cases_dir_name)
    csv_path = Path(scores_csv) if scores_csv else next(
        (d / WORKLIST_NAME for d in (pixel_dir, sample_dir) if d is not None and (d / WORKLIST_NAME).is_file()), None)
    if csv_path is not None and not csv_path.is_file():
        raise ReportError(f"worklist {csv_path} does not exist")
    rows = read_scores_csv(csv_path) if csv_path is not None else None
    cases = _collect(layout, pixel_dir, sample_dir, rows)
    if not cases:
        raise ReportError(f"input folder {layout['scans']} holds no scans (*.nii.gz, *.nii)"
                          + ("" if rows is None else f" and {csv_path} no rows"))
    cases = _rank(cases)
    labelled = layout["label_root"] is not None
    kinds = _kinds(layout["label_root"])
    hint = _dataset_modality(layout["scans"]) if modality == "auto" else None
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    sample_eval = None
    if labelled and layout["sample_labels"] is not None and sample_dir is not None:
        from scripts.evaluate import evaluate

        sample_eval = {c["case"]: c for c in evaluate(layout["input"], sample_dir, "sample",
                                                      label_dir=layout["sample_labels"])["cases"]}
    pixel_counts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    windows: list[str] = []
    for index, case in enumerate(cases):
        _process(case, layout, pixel_dir, kinds, sample_eval, pixel_counts, windows, render=index < max_views,
                 modality=modality, window=window, hint=hint, ident=f"cb{index}")

    rows_metrics, pr_image = [], None
    if labelled:
        rows_metrics, pr_image = _metrics(cases, pixel_counts if pixel_dir is not None and
                                          layout["pixel_labels"] is not None else None, sample_eval)
    info = {"title": title, "input": str(input_dir), "scans": str(layout["scans"]),
            "labels": str(layout["label_root"]) if labelled else None,
            "predictions": sorted({str(d) for d in (pixel_dir, sample_dir) if d is not None}),
            "worklist": str(csv_path) if csv_path is not None else None, "seconds_per_case": seconds_per_case,
            "windows": sorted(set(windows)), "max_views": max_views, "kind": layout["kind"],
            "images_left_out": layout["images_left_out"]}
    html_path = output_dir / "report.html"
    html_path.write_text(_html(info, cases, rows_metrics, pr_image), encoding="utf-8")
    keep = ("rank", "name", "source", "series_uid", "status", "reason", "score", "flag_fpr", "sample_threshold",
            "flagged", "map_max", "location_mm", "voxel_fpr", "voxel_threshold", "volume_above_ml", "seconds",
            "label", "kinds", "pixel", "notes")
    summary = {**info, "n_cases": len(cases), "metrics": rows_metrics,
               "cases": [{k: c.get(k) for k in keep} for c in cases]}
    (output_dir / "report.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return html_path


def _process(case: dict, layout: dict, pixel_dir: Path | None, kinds: dict, sample_eval: dict | None,
             pixel_counts: dict, windows: list, render: bool, modality: str, window, hint, ident: str) -> None:
    """Fill in one case: its label, its map's statistics, its share of the pixel counts and (``render``) its
    views. One case at a time: its arrays are dropped on return."""
    name = case["name"]
    label, label_path = None, None
    if layout["pixel_labels"] is not None and (layout["pixel_labels"] / name).is_file():
        label_path = layout["pixel_labels"] / name
        try:
            label = np.asanyarray(nib.load(str(label_path)).dataobj) > 0.5
        except Exception as err:  # the user's labels: one line, not a traceback
            raise ReportError(f"label {str(label_path)!r} cannot be read ({type(err).__name__}: {err})") from None
    if layout["label_root"] is not None:
        sample_txt = layout["sample_labels"] / f"{name}.txt" if layout["sample_labels"] is not None else None
        try:
            case["label"] = int(float(sample_txt.read_text().split()[0]) > 0.5)
        except Exception:
            case["label"] = int(label.any()) if label is not None else None
        case["kinds"] = kinds.get(name, ["normal"] if case["label"] == 0 else [])
    if sample_eval is not None and f"{name}.txt" in sample_eval and not case["from_worklist"]:
        entry = sample_eval[f"{name}.txt"]
        if entry["status"] == "failed":
            case["notes"].append(entry.get("reason", "unreadable score"))
    prediction = map_affine = None
    needed = render or label is not None or case["map_max"] is None or case["location_mm"] is None
    if case["map_path"] is not None and needed:  # a worklist row without a view needs no map
        try:
            prediction, map_affine = _load_map(case["map_path"])
        except Exception as err:
            case["notes"].append(f"map {name} unreadable: {err}")
    if prediction is not None and label is not None and prediction.shape != label.shape:
        case["notes"].append(f"map shape {prediction.shape} differs from the label's {label.shape}: scored as zeros")
        prediction_for_counts = None
    else:
        prediction_for_counts = prediction
    if label is not None and pixel_dir is not None:
        from scripts.evaluate import count_metrics, float16_bin_counts

        if prediction_for_counts is None:
            pixel_counts[name] = _zero_counts(label)
        else:
            pos, neg, _ = float16_bin_counts(prediction_for_counts, label)
            pixel_counts[name] = (pos, neg)
            case["pixel"] = count_metrics(pos, neg)
    point = None
    if prediction is not None:
        point = np.unravel_index(int(np.argmax(prediction)), prediction.shape)
        if case["map_max"] is None:
            case["map_max"] = float(prediction[point])
        if case["location_mm"] is None:
            padded = [*map(float, point), *[0.0] * (3 - len(point))]  # a 2D map's pixel: the affine's first plane
            case["location_mm"] = [float(v) for v in (map_affine @ np.array([*padded, 1.0]))[:3]]
    if not render:
        return
    scan = scan_affine = None
    if case["scan_path"] is not None:
        try:
            scan, scan_affine = _load_scan(case["scan_path"], case["series_uid"], map_affine)
        except Exception as err:
            case["notes"].append(f"scan {case['source'] or name} not shown: {err}")
    elif case["status"] != "failed":
        case["notes"].append("scan not found in the input folder")
    grid = scan.shape if scan is not None else prediction.shape if prediction is not None else \
        label.shape if label is not None else None
    if grid is None:
        return
    affine = scan_affine if scan is not None else map_affine if prediction is not None else \
        nib.load(str(label_path)).affine
    if prediction is not None and prediction.shape != grid:
        case["notes"].append(f"map shape {prediction.shape} differs from the scan's {grid}: not overlaid")
        prediction, point = None, None
    if label is not None and label.shape != grid:
        label = None
    if len(grid) == 2:  # a 2D image: one view of the whole picture
        case["point"], case["axcodes"] = None, "(columns, rows) of the image"
        case["views"] = [_view_2d(scan, grid, prediction, label, case["voxel_threshold"])]
        if scan is not None:
            windows.append("2D images: equalised onto [-1, 1] as the bundle's preprocessing does, shown -1 black to "
                           "1 white")
        case["colourbar"] = _colourbar_svg(case["views"][0]["height"], case["voxel_threshold"], ident) \
            if prediction is not None else ""
        return
    if point is None and case["location_mm"] is not None:  # the worklist's location, on the scan's grid
        voxel = np.rint(np.linalg.inv(affine) @ np.array([*case["location_mm"], 1.0]))[:3].astype(int)
        point = tuple(int(v) for v in voxel) if all(0 <= v < n for v, n in zip(voxel, grid)) else None
    mark = point is not None
    if point is None:
        point = tuple(n // 2 for n in grid)
        case["notes"].append("no map: slices through the centre")
    if scan is not None:
        lo, hi, text = display_window(scan, modality, window, hint)
        windows.append(text)
    else:
        lo, hi = 0.0, 1.0
    case["point"] = [int(p) for p in point]
    case["axcodes"] = "".join(nib.orientations.aff2axcodes(affine))
    case["views"] = _views(scan, affine, grid, prediction, label, point, (lo, hi), case["voxel_threshold"],
                          mark)
    case["colourbar"] = _colourbar_svg(case["views"][0]["height"], case["voxel_threshold"], ident) \
        if prediction is not None else ""


def _metrics(cases: list[dict], pixel_counts: dict | None, sample_eval: dict | None) -> tuple[list[dict], str]:
    """AP and AUROC overall and per anomaly kind (its cases plus all normal cases), and the PR curves."""
    from sklearn.metrics import precision_recall_curve

    from scripts.evaluate import F16_BINS, count_metrics
    labelled = [c for c in cases if c.get("label") is not None]
    present = sorted({k for c in labelled if c["label"] for k in c["kinds"] if k != "normal"})
    normal = [c["name"] for c in labelled if not c["label"]]
    groups = [("overall", [c["name"] for c in labelled])]
    groups += [(kind, [c["name"] for c in labelled if c["label"] and kind in c["kinds"]] + normal)
               for kind in present]
    rows, pixel_curve, sample_curve = [], None, None
    for group, names in groups:
        chosen = set(names)
        row = {"group": group, "n_cases": len(names),
               "n_anomalous": sum(1 for c in labelled if c["name"] in chosen and c["label"])}
        if pixel_counts is not None:
            pos = sum((pixel_counts[n][0] for n in names if n in pixel_counts), np.zeros(F16_BINS, dtype=np.int64))
            neg = sum((pixel_counts[n][1] for n in names if n in pixel_counts), np.zeros(F16_BINS, dtype=np.int64))
            row["pixel"] = count_metrics(pos, neg)
            if group == "overall":
                pixel_curve = pr_curve_from_counts(pos, neg)
        if sample_eval is not None:
            entries = [sample_eval[n + ".txt"] for n in names if n + ".txt" in sample_eval]
            labels, scores = [e["label"] for e in entries], [e["score"] for e in entries]
            row["sample"] = _score_metrics(labels, scores)
            if group == "overall" and sum(labels) > 0:
                precision, recall, _ = precision_recall_curve(labels, scores)
                sample_curve = (recall[::-1], precision[::-1])
        rows.append(row)
    overall = rows[0]
    image = _pr_figure(pixel_curve, sample_curve, overall.get("pixel", {}).get("average_precision"),
                       overall.get("sample", {}).get("average_precision"))
    return rows, image


# --------------------------------------------------------------------------------------------------- HTML
# the report's stylesheet; its rules apply inside <div class='mood-report'> (pages that embed reports, such as
# tools.demo's index, use it for their own content too)
STYLE = """
.mood-report{font-family:"DejaVu Sans",Verdana,"Segoe UI",Roboto,sans-serif;font-size:16px;line-height:1.45;
  color:#1a1a1a;max-width:1320px;margin:0 auto;padding:0 16px 40px}
.mood-report h1{font-size:1.75em;margin:.5em 0 .4em}
.mood-report h2{font-size:1.3em;margin:1.8em 0 .6em;padding-bottom:.2em;border-bottom:2px solid #ccc}
.mood-report h3{font-size:1.1em;margin:0 0 .3em}
.mood-report table{border-collapse:collapse;margin:.3em 0 1em}
.mood-report th,.mood-report td{border:1px solid #bbb;padding:4px 10px;text-align:right;vertical-align:top}
.mood-report th{background:#eef0f3;text-align:left}
.mood-report td:first-child,.mood-report .l{text-align:left}
.mood-report table.summary th{text-align:left;font-weight:600;white-space:nowrap}
.mood-report table.summary td{text-align:left}
.mood-report tr.flagged td{background:#fde1dc}
.mood-report tr.flagged td.flag{font-weight:700;color:#a40000}
.mood-report tr.failed td,.mood-report tr.missing td{background:#f3f3f3;color:#555}
.mood-report tr.overall td{font-weight:700}
.mood-report .src{display:block;font-size:.85em;color:#555}
.mood-report .note{color:#444}
.mood-report .case{margin:1.6em 0 2.2em;padding-top:.8em;border-top:1px solid #ddd}
.mood-report .case.flagged h3{color:#a40000}
.mood-report .facts{margin:.2em 0 .6em}
.mood-report .views{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.mood-report figure{margin:0}
.mood-report .slice{position:relative;line-height:0;background:#000}
.mood-report .slice img{display:block;max-width:none}
.mood-report .o{position:absolute;color:#fff;font-weight:700;font-size:16px;line-height:1;
  text-shadow:0 0 3px #000,0 0 3px #000,0 0 1px #000}
.mood-report .o.l{left:6px;top:50%;transform:translateY(-50%)}
.mood-report .o.r{right:6px;top:50%;transform:translateY(-50%)}
.mood-report .o.t{top:6px;left:50%;transform:translateX(-50%)}
.mood-report .o.b{bottom:6px;left:50%;transform:translateX(-50%)}
.mood-report figcaption{font-size:.95em;margin-top:5px;line-height:1.3}
.mood-report .legend figcaption{width:150px;font-size:.9em}
.mood-report .colourbar text{fill:#1a1a1a}
"""


def _case_id(case: dict, used: set) -> str:
    base = "case-" + (re.sub(r"[^A-Za-z0-9]+", "-", case["name"]).strip("-") or "x")
    ident, n = base, 1
    while ident in used:
        n += 1
        ident = f"{base}-{n}"
    used.add(ident)
    return ident


def _location(case: dict) -> str:
    loc = case.get("location_mm")
    return "\u2014" if not loc else "(" + ", ".join(f"{v:.1f}" for v in loc) + ")"


def _status(case: dict) -> str:
    text = case["status"] if case["status"] != "missing" else "missing prediction"
    details = [case["reason"]] if case["reason"] else []
    details += case["notes"] if case["status"] == "ok" else []
    return text + (": " + "; ".join(details) if details else "")


def _flag_text(case: dict) -> str:
    return {True: "yes", False: "no"}.get(case["flagged"], "\u2014")


def _thresholds(cases: list[dict], key: str, rate_key: str) -> list[tuple[float, float | None]]:
    return sorted({(c[key], c[rate_key]) for c in cases if c.get(key) is not None}, key=lambda t: t[0])


def _html(info: dict, cases: list[dict], rows: list[dict], pr_image: str | None) -> str:
    e = html.escape
    labelled = info["labels"] is not None
    worklist = info["worklist"] is not None
    n = len(cases)
    by_status = {s: sum(1 for c in cases if c["status"] == s) for s in ("ok", "failed", "missing")}
    sample_thr = _thresholds(cases, "sample_threshold", "flag_fpr")
    voxel_thr = _thresholds(cases, "voxel_threshold", "voxel_fpr")
    n_flagged = sum(1 for c in cases if c["flagged"])
    seconds = [c["seconds"] for c in cases if c.get("seconds") is not None]

    summary = [("Input", e(info["scans"]) + (f" (labels: {e(info['labels'])})" if labelled else " (no labels)")
                + ("; 2D images (PNG, JPEG, DICOM), one view each" if info.get("kind") == "images" else "")
                + (f"; {info['images_left_out']} 2D image file(s) beside the NIfTI scans left out (a folder with "
                   "NIfTI scans is read as volumes)" if info.get("images_left_out") else "")),
               ("Predictions", e(", ".join(info["predictions"])))]
    if worklist:
        summary.append(("Worklist", e(info["worklist"])))
    else:
        summary.append(("Worklist", "none (no scores.csv in the predictions folder)"))
    summary.append(("Cases", f"{n}: {by_status['ok']} scored, {by_status['failed']} failed, "
                             f"{by_status['missing']} without a prediction"))
    if sample_thr:
        thr = "; ".join(f"sample score &gt; {t:.4f} (false-positive rate {_pct(r)} on normal scans)"
                        for t, r in sample_thr)
        n_failed_flagged = sum(1 for c in cases if c["flagged"] and c["status"] == "failed")
        also = f" (including {n_failed_flagged} failed: a scan that could not be scored)" if n_failed_flagged else ""
        summary.append(("Flagged", f"{n_flagged} of {n}{also} at {thr}"))
    elif worklist:
        summary.append(("Flagged", "no flags: the model has no recorded operating point (no sample threshold)"))
    if voxel_thr:
        summary.append(("Voxel threshold", "; ".join(f"{t:.4f} (false-positive rate {_pct(r)} of normal voxels)"
                                                     for t, r in voxel_thr)))
    elif worklist:
        summary.append(("Voxel threshold", "none recorded: no volume above threshold, no threshold on the colour "
                                           "bars"))
    if info["windows"]:
        summary.append(("Display", e("; ".join(info["windows"]))))
    if seconds:
        summary.append(("Run time", f"{sum(seconds):.1f} s in all, {sum(seconds) / len(seconds):.1f} s per case "
                                    "(scores.csv)"))
    elif info["seconds_per_case"] is not None:
        spc = info["seconds_per_case"]
        summary.append(("Run time", f"{spc:.2f} s per case ({spc * n:.1f} s in all)"))
    if labelled and rows:
        overall = rows[0]
        parts = [f"{level} AP {fmt_metric(overall[level]['average_precision'])}" for level in ("pixel", "sample")
                 if level in overall]
        summary.append(("Against the labels", ", ".join(parts) + " (details below)"))
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
           "<meta name='viewport' content='width=device-width, initial-scale=1'>",
           f"<title>{e(info['title'])}</title></head><body>", "<div class='mood-report'>",
           f"<style>{STYLE}</style>", f"<h1>{e(info['title'])}</h1>",
           "<h2>Summary</h2>", "<table class='summary'>"]
    out += [f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in summary]
    out.append("</table>")
    if not worklist:
        out.append("<p class='note no-worklist'>No scores.csv: no thresholds and no flags; the scores and map maxima "
                   "are read from the .txt and map files.</p>")

    # worklist
    used: set = set()
    for case in cases:
        case["id"] = _case_id(case, used)
    head = ["#", "name", "sample score", "flagged", "status", "map max", "max at (x, y, z) mm RAS",
            "above voxel thr. (mL)"]
    head += ["label", "kinds"] if labelled else []
    head += ["seconds"] if seconds else []
    out += ["<h2>Worklist</h2>",
            "<p class='note'>Sorted by sample score, highest first; cases without a score, then failed cases, at the "
            "end. Names link to the case's views.</p>",
            "<table class='worklist'><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for case in cases:
        cls = "failed" if case["status"] == "failed" else "missing" if case["status"] == "missing" else ""
        cls = (cls + " flagged").strip() if case["flagged"] else cls
        name = e(case["name"])
        cell = f"<a href='#{case['id']}'>{name}</a>" if case.get("views") else name
        if case["source"] and case["source"] != case["name"]:
            cell += f"<span class='src'>{e(case['source'])}</span>"
        cells = [f"<td>{case['rank'] if case['rank'] is not None else DASH}</td>", f"<td class='l'>{cell}</td>",
                 f"<td>{_num(case['score'], 4)}</td>", f"<td class='flag'>{_flag_text(case)}</td>",
                 f"<td class='l'>{e(_status(case))}</td>", f"<td>{_num(case['map_max'], 3)}</td>",
                 f"<td>{_location(case)}</td>", f"<td>{_num(case['volume_above_ml'], 2)}</td>"]
        if labelled:
            label = case.get("label")
            cells += [f"<td>{DASH if label is None else label}</td>",
                      f"<td class='l'>{e(', '.join(case.get('kinds') or []))}</td>"]
        if seconds:
            cells.append(f"<td>{_num(case.get('seconds'), 1)}</td>")
        out.append(f"<tr class='{cls}' data-case='{name}'>" + "".join(cells) + "</tr>")
    out.append("</table>")

    if labelled and rows:
        has_pixel, has_sample = "pixel" in rows[0], "sample" in rows[0]
        head = ["group", "cases", "anomalous"]
        head += ["pixel AP", "pixel AUROC"] if has_pixel else []
        head += ["sample AP", "sample AUROC"] if has_sample else []
        out += ["<h2>Average precision and AUROC</h2>",
                "<p class='note'>As MOOD's evaluation (scripts.evaluate): pixel level pooled over all voxels of the "
                "cases, sample level over their scores; predictions clipped to [0, 1], NaN and missing ones as 0. "
                "Per anomaly kind: the cases of that kind plus all normal cases.</p>",
                "<table class='metrics'><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
        for row in rows:
            cls = "overall" if row["group"] == "overall" else "kind"
            cells = [e(row["group"]), str(row["n_cases"]), str(row["n_anomalous"])]
            for level, present in (("pixel", has_pixel), ("sample", has_sample)):
                if present:
                    cells += [fmt_metric(row[level]["average_precision"]), fmt_metric(row[level]["auroc"])]
            out.append(f"<tr class='{cls}' data-group='{e(row['group'])}'>"
                       + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        out.append("</table>")
        if pr_image:
            out += ["<h2>Precision-recall curves</h2>",
                    f"<img alt='precision-recall curves' src='{pr_image}' width='1000' height='400'>"]

    viewed = [c for c in cases if c.get("views")]
    flat = sum(1 for c in viewed if len(c["views"]) == 1 and c["views"][0]["name"] == "image")
    how = []
    if flat < len(viewed) or not viewed:
        how.append("Slices through the map's maximum (yellow ticks on the borders), in the radiological convention "
                   "with the patient's orientation on every edge (R/L, A/P, S/I).")
    if flat:
        how.append("2D images: the whole image in one view, as the bundle preprocesses it (equalised onto [-1, 1], "
                   "shown black to white), rows top to bottom as the file stores them; no orientation letters (the "
                   "pixel grid does not state the patient's axes).")
    out += ["<h2>Cases</h2>",
            "<p class='note'>" + " ".join(how) + " The map is overlaid "
            f"semi-transparently where it is at least {OVERLAY_FLOOR:g}; green outline: above the voxel threshold; "
            "cyan outline: ground truth."
            + (f" Views of the {len(viewed)} highest-ranked of {n} cases (--max_views)." if len(viewed) < n else "")
            + "</p>"]
    for case in viewed:
        out.append(_case_html(case, labelled))
    out += ["</div>", "</body></html>", ""]
    return "\n".join(out)


def _case_html(case: dict, labelled: bool) -> str:
    e = html.escape
    facts = [f"sample score <b>{_num(case['score'], 4)}</b>"]
    if case["status"] == "failed" and case["flagged"]:
        facts[0] += ", <b>flagged</b> (could not be scored)"
    elif case["sample_threshold"] is not None and case["flagged"] is not None:
        facts[0] += (f", <b>flagged</b> (&gt; {case['sample_threshold']:.4f})" if case["flagged"]
                     else f", not flagged (threshold {case['sample_threshold']:.4f})")
    if case["map_max"] is not None:
        facts.append(f"map max {case['map_max']:.3f} at {_location(case)} mm")
    if case["volume_above_ml"] is not None:
        facts.append(f"{case['volume_above_ml']:.2f} mL above the voxel threshold")
    if labelled and case.get("label") is not None:
        kinds = ", ".join(case.get("kinds") or []) or "kind unknown"
        facts.append(f"label: {'anomalous' if case['label'] else 'normal'} ({e(kinds)})")
        if case.get("pixel"):
            facts.append(f"pixel AP {fmt_metric(case['pixel'].get('average_precision'))}")
    facts.append(f"file axes {e(case['axcodes'])}")
    if case["status"] != "ok":
        facts.append(e(_status(case)))
    rank = f"#{case['rank']} \u00b7 " if case["rank"] is not None else ""
    flag = " flagged" if case["flagged"] else ""
    figures = []
    for view in case["views"]:
        letters = "".join(f"<span class='o {k}'>{v}</span>" for k, v in view["letters"].items())
        figures.append(f"<figure class='panel {view['name']}'><div class='slice' style='width:{view['width']}px'>"
                       f"<img alt='{e(case['name'])} {view['name']}' src='{view['uri']}' width='{view['width']}' "
                       f"height='{view['height']}'>{letters}</div><figcaption>{e(view['caption'])}</figcaption>"
                       "</figure>")
    if case["colourbar"]:
        note = "thr: voxel threshold" if case["voxel_threshold"] is not None else "no voxel threshold recorded"
        figures.append(f"<figure class='legend'>{case['colourbar']}<figcaption>anomaly map (grey: &lt; "
                       f"{OVERLAY_FLOOR:g}, not drawn); {note}</figcaption></figure>")
    notes = [n for n in case["notes"] if case["status"] == "ok"]
    return (f"<div class='case{flag}' id='{case['id']}' data-case='{e(case['name'])}'>"
            f"<h3>{rank}{e(case['name'])}</h3><p class='facts'>{DOT.join(facts)}</p>"
            f"<div class='views'>{''.join(figures)}</div>"
            + (f"<p class='note'>{e('; '.join(notes))}</p>" if notes else "") + "</div>")


# ---------------------------------------------------------------------------------------------------- CLI
def _window_arg(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}") from None
    if not hi > lo:
        raise argparse.ArgumentTypeError(f"HIGH must exceed LOW, got {text!r}")
    return lo, hi


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", "--data_dir", dest="input", required=True,
                        help="folder of scans, or a MOOD-layout dataset folder (toy/, toy_label/)")
    parser.add_argument("--pred", default=None, help="inference output folder (maps, .txt scores, scores.csv)")
    parser.add_argument("--pixel_dir", default=None, help="folder of <name> anomaly maps (default: --pred)")
    parser.add_argument("--sample_dir", default=None, help="folder of <name>.txt scores (default: --pred)")
    parser.add_argument("--scores_csv", default=None, help="the worklist (default: PRED/scores.csv when present)")
    parser.add_argument("--output_dir", default="report")
    parser.add_argument("--title", default=DEFAULT_TITLE)
    parser.add_argument("--modality", choices=("auto", "ct", "mr"), default="auto",
                        help="display window: CT soft tissue (W 400 / L 40 HU) or MR percentiles")
    parser.add_argument("--window", type=_window_arg, default=None, help="LOW,HIGH: the window in the scans' units")
    parser.add_argument("--max_views", type=int, default=DEFAULT_MAX_VIEWS,
                        help="cases with slice views (the highest-ranked)")
    parser.add_argument("--seconds_per_case", type=float, default=None)
    parser.add_argument("--cases_dir_name", default="toy")
    args = parser.parse_args(argv)
    pixel_dir = args.pixel_dir or args.pred
    sample_dir = args.sample_dir or args.pred
    try:
        path = write_report(args.input, pixel_dir, sample_dir, args.output_dir, title=args.title,
                            seconds_per_case=args.seconds_per_case, cases_dir_name=args.cases_dir_name,
                            modality=args.modality, window=args.window, max_views=args.max_views,
                            scores_csv=args.scores_csv)
    except ReportError as err:
        print(f"report: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    main()
