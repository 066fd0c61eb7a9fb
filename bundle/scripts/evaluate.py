"""Score a folder of MOOD predictions against a MOOD-layout dataset's labels, as the challenge does.

Run::

    PYTHONPATH=bundle python -m scripts.evaluate --data_dir DATA --pred_dir PRED --mode pixel|sample \\
        [--output JSON] [--cases_dir_name toy] [--label_dir DIR]

``DATA`` holds ``toy/`` (scans ``toy_N.nii.gz``), ``toy_label/pixel/toy_N.nii.gz`` (binary masks) and
``toy_label/sample/toy_N.nii.gz.txt`` (0 or 1). Semantics follow MOOD ``scripts/evalresults.py``
(the challenge's evaluation code, github.com/MIC-DKFZ/mood), re-implemented:

- every label file is one case; the prediction with the same name is read from ``PRED`` (pixel: the NIfTI
  ``<name>``; sample: the text file ``<name>.txt`` - the label file's own name - holding one float on its
  first line);
- pixel predictions are read as float16 and clipped to [0, 1]; sample scores are clipped to [0, 1];
- a missing prediction, an unreadable one or one whose shape differs from the label's counts as all zeros
  (sample: score 0) and is reported by name with the reason;
- pixel labels are ``mask > 0.5`` (MOOD: ``rint`` then ``== 1``); sample labels ``value > 0.5``; a label
  that cannot be read drops its case (MOOD skips it too) and is reported under ``label_errors``;
- pixel: all voxels of all cases are pooled into ONE average precision (sklearn's definition); sample: one
  AP over the per-case scores.

Deviation: NaN predictions count as 0 (the lowest score). MOOD's ``np.clip`` keeps NaN and sklearn then
refuses the whole evaluation; the number of NaN voxels (or NaN scores) is reported per case.

Memory: one case at a time, never all voxels. Float16 values in [0, 1] have at most 0x3C01 distinct bit
patterns, monotone in value (-0.0 is merged into 0.0), so positive and negative voxels are counted per bit
pattern and AP and AUROC are computed exactly from those counts (:func:`scripts.training.metrics.
average_precision_from_counts`, :func:`auroc_from_counts`), equal to sklearn on the concatenated voxels.

Output: a JSON (default ``PRED/evaluation_<mode>.json``) with ``average_precision``, ``auroc``, counts,
``missing``, ``failed``, ``label_errors`` and one entry per case (pixel: its own AP and AUROC, null where
undefined); a short summary is printed, the JSON path last.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from scripts.io.files import save_json
from scripts.training.metrics import average_precision_from_counts

__all__ = ["MODES", "auroc_from_counts", "count_metrics", "evaluate", "float16_bin_counts", "main"]

MODES = ("pixel", "sample")
# Bit pattern of float16 1.0; every float16 in [0, 1] has a bit pattern in [0, 0x3C00], ordered as its value.
_F16_ONE_BITS = int(np.array(1.0, dtype=np.float16).view(np.uint16))
F16_BINS = _F16_ONE_BITS + 1
# Voxels converted per step (float16 + bit patterns + bincount buffers stay at a few tens of MiB).
CHUNK_VOXELS = 1 << 22


def auroc_from_counts(positives, negatives) -> float:
    """Area under the ROC curve from counts of positive and negative items per score bin (bins in increasing
    score order); items in one bin tie and a tied positive/negative pair counts one half (as sklearn's
    ``roc_auc_score``). Returns NaN when there is no positive or no negative."""
    pos = torch.as_tensor(positives).double().reshape(-1)
    neg = torch.as_tensor(negatives).double().reshape(-1)
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    below = torch.cumsum(neg, 0) - neg  # negatives with a strictly lower score than each bin
    return float(((pos / n_pos) * ((below + 0.5 * neg) / n_neg)).sum())


def _clean_float16(values: np.ndarray) -> np.ndarray:
    """Values as MOOD reads a pixel prediction (float16, clipped to [0, 1]) with NaN set to 0."""
    with np.errstate(over="ignore", invalid="ignore"):  # |x| > 65504 becomes +-inf, clipped below
        out = np.asarray(values).astype(np.float16)
    np.clip(out, 0.0, 1.0, out=out)
    out[np.isnan(out)] = 0.0
    return out


def float16_bin_counts(prediction: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(positives, negatives, NaN count): voxels per float16 score bin, bins in increasing score order.

    ``prediction`` is any real array (cast to float16, clipped to [0, 1], NaN -> 0), ``label`` a boolean array
    of the same shape; both are processed in slabs along the last axis so no full float16 copy is made.
    """
    if prediction.shape != label.shape:
        raise ValueError(f"shape {prediction.shape} != label shape {label.shape}")
    positives = np.zeros(F16_BINS, dtype=np.int64)
    totals = np.zeros(F16_BINS, dtype=np.int64)
    nans = 0
    if prediction.ndim == 0:
        prediction, label = prediction.reshape(1), label.reshape(1)
    plane = max(1, math.prod(prediction.shape[:-1]))
    step = max(1, CHUNK_VOXELS // plane)
    for start in range(0, prediction.shape[-1], step):
        raw = np.asarray(prediction[..., start:start + step])
        if raw.dtype.kind == "f":
            nans += int(np.count_nonzero(np.isnan(raw)))
        scores = _clean_float16(raw)
        # Non-negative float16 bit patterns are monotone in value; the mask merges -0.0 (0x8000) into 0.0.
        bits = (scores.view(np.uint16) & np.uint16(0x7FFF)).reshape(-1)
        lab = np.asarray(label[..., start:start + step], dtype=bool).reshape(-1)
        totals += np.bincount(bits, minlength=F16_BINS)
        positives += np.bincount(bits[lab], minlength=F16_BINS)
    return positives, totals - positives, nans


def _nullable(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def count_metrics(positives: np.ndarray, negatives: np.ndarray) -> dict:
    """AP, AUROC and class counts from per-bin counts of positives and negatives (None where undefined)."""
    n_pos, n_neg = int(positives.sum()), int(negatives.sum())
    ap = None
    if n_pos > 0:
        ap = average_precision_from_counts(torch.from_numpy(positives), torch.from_numpy(negatives))
    return {"average_precision": _nullable(ap), "auroc": _nullable(auroc_from_counts(positives, negatives)),
            "n_positives": n_pos, "n_negatives": n_neg}


def _label_files(label_dir: Path) -> list[Path]:
    if not label_dir.is_dir():
        raise FileNotFoundError(f"label folder not found: {label_dir}")
    files = sorted(p for p in label_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"no label files in {label_dir}")
    return files


def _read_nifti(path: Path) -> tuple[nib.spatialimages.SpatialImage, tuple[int, ...]]:
    img = nib.load(str(path))
    return img, tuple(int(n) for n in img.shape)


def _read_float(path: Path) -> float:
    with open(path) as handle:
        return float(handle.readline())


def _pixel_cases(label_files: list[Path], pred_dir: Path, result: dict) -> tuple[np.ndarray, np.ndarray]:
    positives = np.zeros(F16_BINS, dtype=np.int64)
    negatives = np.zeros(F16_BINS, dtype=np.int64)
    for label_path in label_files:
        name = label_path.name
        try:
            label = np.asanyarray(nib.load(str(label_path)).dataobj) > 0.5
        except Exception as err:  # MOOD drops a case whose label cannot be read
            result["label_errors"].append({"case": name, "reason": f"unreadable label: {err}"})
            continue
        case = {"case": name, "status": "ok"}
        prediction = None
        pred_path = pred_dir / name
        if not pred_path.is_file():
            case.update(status="missing", reason="prediction file not found")
        else:
            try:
                img, shape = _read_nifti(pred_path)
                if shape != label.shape:
                    raise ValueError(f"shape {shape} != label shape {label.shape}")
                prediction = np.asanyarray(img.dataobj)
            except Exception as err:
                case.update(status="failed", reason=str(err) or type(err).__name__)
        if prediction is None:  # scored as all zeros
            n_pos = int(np.count_nonzero(label))
            pos = np.zeros(F16_BINS, dtype=np.int64)
            neg = np.zeros(F16_BINS, dtype=np.int64)
            pos[0], neg[0] = n_pos, label.size - n_pos
            nans = 0
        else:
            pos, neg, nans = float16_bin_counts(prediction, label)
        del prediction, label
        positives += pos
        negatives += neg
        case.update(count_metrics(pos, neg))
        case["nan_voxels"] = nans
        result["cases"].append(case)
    return positives, negatives


def _sample_cases(label_files: list[Path], pred_dir: Path, result: dict) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = [], []
    for label_path in label_files:
        name = label_path.name  # e.g. toy_0.nii.gz.txt: the prediction file has the same name
        try:
            label = _read_float(label_path) > 0.5
        except Exception as err:
            result["label_errors"].append({"case": name, "reason": f"unreadable label: {err}"})
            continue
        case = {"case": name, "status": "ok", "label": int(label)}
        score, is_nan = 0.0, False
        pred_path = pred_dir / name
        if not pred_path.is_file():
            case.update(status="missing", reason="prediction file not found")
        else:
            try:
                raw = _read_float(pred_path)
                is_nan = math.isnan(raw)
                score = 0.0 if is_nan else min(max(raw, 0.0), 1.0)
            except Exception as err:
                case.update(status="failed", reason=f"unreadable score: {err}")
        case.update(score=score, nan=is_nan)
        labels.append(label)
        scores.append(score)
        result["cases"].append(case)
    if not scores:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    values, index = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True)
    labels_arr = np.asarray(labels, dtype=bool)
    positives = np.bincount(index[labels_arr], minlength=len(values)).astype(np.int64)
    negatives = np.bincount(index[~labels_arr], minlength=len(values)).astype(np.int64)
    return positives, negatives


def evaluate(data_dir: str | os.PathLike, pred_dir: str | os.PathLike, mode: str, cases_dir_name: str = "toy",
             label_dir: str | os.PathLike | None = None) -> dict:
    """MOOD-style evaluation of ``pred_dir`` against ``data_dir/<cases_dir_name>_label/<mode>`` (or
    ``label_dir``): a dict with the pooled ``average_precision`` and ``auroc`` (None where undefined), counts,
    ``missing`` / ``failed`` / ``label_errors`` and per-case entries (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    data_dir, pred_dir = Path(data_dir), Path(pred_dir)
    label_dir = Path(label_dir) if label_dir is not None else data_dir / f"{cases_dir_name}_label" / mode
    label_files = _label_files(label_dir)
    result: dict = {"mode": mode, "data_dir": str(data_dir), "label_dir": str(label_dir),
                    "pred_dir": str(pred_dir), "cases": [], "label_errors": []}
    if mode == "pixel":
        positives, negatives = _pixel_cases(label_files, pred_dir, result)
    else:
        positives, negatives = _sample_cases(label_files, pred_dir, result)
    cases = result.pop("cases")
    label_errors = result.pop("label_errors")
    result.update(count_metrics(positives, negatives))
    positive_case = (lambda c: c["n_positives"] > 0) if mode == "pixel" else (lambda c: c["label"] == 1)
    result.update(
        n_cases=len(cases),
        n_positive_cases=sum(1 for c in cases if positive_case(c)),
        n_missing=sum(1 for c in cases if c["status"] == "missing"),
        n_failed=sum(1 for c in cases if c["status"] == "failed"),
        missing=[c["case"] for c in cases if c["status"] == "missing"],
        failed=[{"case": c["case"], "reason": c["reason"]} for c in cases if c["status"] == "failed"],
        label_errors=label_errors,
        nan_predictions=(sum(c["nan_voxels"] for c in cases) if mode == "pixel"
                         else sum(1 for c in cases if c["nan"])),
        notes=("MOOD evalresults.py semantics: predictions clipped to [0, 1] (pixel: read as float16); missing, "
               "unreadable or wrongly shaped predictions scored as zeros; NaN predictions scored as 0."),
        cases=cases,
    )
    return result


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.6f}"


def summary(result: dict) -> str:
    """A few human-readable lines about an :func:`evaluate` result."""
    unit = "voxels" if result["mode"] == "pixel" else "cases"
    lines = [
        f"MOOD {result['mode']} evaluation of {result['pred_dir']}: {result['n_cases']} cases "
        f"({result['n_positive_cases']} anomalous), {result['n_missing']} missing, {result['n_failed']} failed",
        f"  average precision: {_fmt(result['average_precision'])}",
        f"  AUROC:             {_fmt(result['auroc'])}",
        f"  {unit}: {result['n_positives']} positive, {result['n_negatives']} negative",
    ]
    if result["nan_predictions"]:
        lines.append(f"  NaN predictions scored as 0: {result['nan_predictions']} {unit}")
    lines += [f"  missing: {name}" for name in result["missing"]]
    lines += [f"  failed: {item['case']} ({item['reason']})" for item in result["failed"]]
    lines += [f"  label error (case skipped): {item['case']} ({item['reason']})" for item in result["label_errors"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="MOOD-layout dataset folder (holds <cases>_label/)")
    parser.add_argument("--pred_dir", required=True, help="folder of predictions named like the labels")
    parser.add_argument("--mode", required=True, choices=MODES)
    parser.add_argument("--output", default=None, help="JSON path (default: <pred_dir>/evaluation_<mode>.json)")
    parser.add_argument("--cases_dir_name", default="toy", help="cases folder name; labels in <name>_label/")
    parser.add_argument("--label_dir", default=None, help="label folder, overriding <data_dir>/<name>_label/<mode>")
    args = parser.parse_args(argv)
    result = evaluate(args.data_dir, args.pred_dir, args.mode, cases_dir_name=args.cases_dir_name,
                      label_dir=args.label_dir)
    output = args.output or Path(args.pred_dir) / f"evaluation_{args.mode}.json"
    path = save_json(result, output)
    print(summary(result))
    print(path)
    return result


if __name__ == "__main__":
    main()
