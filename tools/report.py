"""A self-contained HTML report of MOOD predictions on a MOOD-layout dataset (images embedded as base64 PNG).

Run::

    PYTHONPATH=bundle:. python -m tools.report --data_dir DATA [--pixel_dir P] [--sample_dir S] --output_dir OUT \\
        [--title T] [--seconds_per_case SEC] [--cases_dir_name toy]

``DATA`` is one dataset folder as :mod:`tools.toy_data` writes it (``toy/``, ``toy_label/pixel``,
``toy_label/sample``, optionally ``toy_label/anomalies.json``); ``P`` holds ``<case>.nii.gz`` anomaly maps and
``S`` ``<case>.nii.gz.txt`` scores, as the MOOD run scripts write them. The report (``OUT/report.html``) holds:

- per case: three orthogonal slices through the most anomalous voxel of the map (argmax; the centre without a
  map) with the map overlaid (semi-transparent colormap) and the ground-truth outline, the sample score and
  label, the case's anomaly kinds (from ``anomalies.json``);
- precision-recall curves: pixel level pooled over all voxels of all cases (from float16 bin counts as
  :mod:`scripts.evaluate` does, never all voxels at once), sample level over the scores;
- AP and AUROC overall and per anomaly kind (the cases of that kind plus all normal cases);
- the run time per case, when given.

Predictions are read as :func:`scripts.evaluate.evaluate` reads them (clipped to [0, 1], NaN as 0, a missing or
mis-shaped prediction as zeros), so the overall numbers equal its results. The PNGs are also written to ``OUT``,
with ``report.json`` (the numbers). The last printed line is ``report: <path of the HTML>``.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score  # noqa: E402

from scripts.evaluate import F16_BINS, count_metrics, evaluate, float16_bin_counts  # noqa: E402

__all__ = ["DISPLAY_SIDE", "fmt_metric", "main", "pr_curve_from_counts", "write_report"]

DISPLAY_SIDE = 128  # slices are strided down to at most about this many pixels a side for display
DPI = 72
DEFAULT_TITLE = "MOOD anomaly detection report"


def fmt_metric(value: float | None) -> str:
    """How the report prints AP and AUROC (4 decimals; an em dash where undefined)."""
    return "\u2014" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _score_metrics(labels: Sequence[int], scores: Sequence[float]) -> dict:
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


# -------------------------------------------------------------------------------------------------- images
def _png(fig, path: Path) -> str:
    """Save ``fig`` to ``path`` and return it as a data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    path.write_bytes(data)
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _stride(shape: Sequence[int]) -> int:
    return max(1, math.ceil(max(shape) / DISPLAY_SIDE))


def _slices(volume: np.ndarray | None, point: Sequence[int]) -> list[np.ndarray | None]:
    """The sagittal, coronal and axial slices of ``volume`` through ``point``, strided for display."""
    if volume is None:
        return [None, None, None]
    out = []
    for axis in range(3):
        index = [slice(None)] * 3
        index[axis] = int(point[axis])
        plane = np.asarray(volume[tuple(index)], dtype=np.float32)
        step = _stride(plane.shape)
        out.append(plane[::step, ::step].T)  # rows: second remaining axis, shown with origin="lower"
    return out


def _case_figure(scan: np.ndarray, label: np.ndarray | None, prediction: np.ndarray | None, point, caption: str,
                 path: Path) -> str:
    scan_sl, label_sl, pred_sl = _slices(scan, point), _slices(label, point), _slices(prediction, point)
    values = np.concatenate([s.reshape(-1) for s in scan_sl])
    lo, hi = (float(v) for v in np.percentile(values, [1, 99.5])) if values.size else (0.0, 1.0)
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.9))
    names = ("sagittal", "coronal", "axial")
    for axis, ax in enumerate(axes):
        ax.imshow(scan_sl[axis], cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower")
        if pred_sl[axis] is not None:
            heat = np.ma.masked_less(pred_sl[axis], 0.02)
            ax.imshow(heat, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.5, origin="lower")
        if label_sl[axis] is not None and label_sl[axis].any() and not label_sl[axis].all():
            ax.contour(label_sl[axis].astype(np.float32), levels=[0.5], colors="cyan", linewidths=0.8)
        ax.set_title(f"{names[axis]} {int(point[axis])}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(caption, fontsize=8)
    return _png(fig, path)


def _pr_figure(pixel_curve, sample_curve, pixel_ap, sample_ap, path: Path) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.0))
    for ax, curve, ap, name in ((axes[0], pixel_curve, pixel_ap, "pixel (pooled voxels)"),
                                (axes[1], sample_curve, sample_ap, "sample (cases)")):
        if curve is not None and curve[0].size:
            ax.step(curve[0], curve[1], where="post", color="tab:blue")
            ax.set_title(f"{name}: AP {fmt_metric(ap)}", fontsize=9)
        else:
            ax.set_title(f"{name}: no data", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall", fontsize=8)
        ax.set_ylabel("precision", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return _png(fig, path)


# ------------------------------------------------------------------------------------------------ reading
def _read_prediction(path: Path, shape: tuple[int, ...]) -> tuple[np.ndarray | None, str]:
    """The anomaly map as float32 in [0, 1] (NaN as 0), or None with the reason."""
    if not path.is_file():
        return None, "missing"
    try:
        img = nib.load(str(path))
        if tuple(img.shape) != shape:
            return None, f"shape {tuple(img.shape)} != label shape {shape}"
        pred = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:
        return None, f"unreadable: {err}"
    pred = np.nan_to_num(pred, nan=0.0, posinf=1.0, neginf=0.0)
    np.clip(pred, 0.0, 1.0, out=pred)
    return pred, "ok"


def _zero_counts(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos, neg = np.zeros(F16_BINS, dtype=np.int64), np.zeros(F16_BINS, dtype=np.int64)
    pos[0] = int(np.count_nonzero(label))
    neg[0] = label.size - pos[0]
    return pos, neg


def _kinds(data_dir: Path, cases_dir_name: str) -> dict[str, list[str]]:
    path = data_dir / f"{cases_dir_name}_label" / "anomalies.json"
    if not path.is_file():
        return {}
    meta = json.loads(path.read_text())
    return {name: list(info.get("kinds") or []) for name, info in meta.get("cases", {}).items()}


# ------------------------------------------------------------------------------------------------- report
def write_report(data_dir: str | os.PathLike, pixel_dir: str | os.PathLike | None = None,
                 sample_dir: str | os.PathLike | None = None, output_dir: str | os.PathLike = "report",
                 title: str = DEFAULT_TITLE, seconds_per_case: float | None = None,
                 cases_dir_name: str = "toy") -> Path:
    """Write ``output_dir/report.html`` (self-contained), the PNGs it embeds and ``report.json``; return the
    HTML's path. See the module docstring."""
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    pixel_dir = Path(pixel_dir) if pixel_dir is not None else None
    sample_dir = Path(sample_dir) if sample_dir is not None else None
    output_dir.mkdir(parents=True, exist_ok=True)
    label_root = data_dir / f"{cases_dir_name}_label"
    pixel_labels = sorted(p for p in (label_root / "pixel").iterdir() if p.is_file() and not p.name.startswith("."))
    if not pixel_labels:
        raise ValueError(f"no pixel labels in {label_root / 'pixel'}")
    kinds = _kinds(data_dir, cases_dir_name)

    sample = None
    if sample_dir is not None:
        sample = {c["case"]: c for c in evaluate(data_dir, sample_dir, "sample", cases_dir_name)["cases"]}

    cases: list[dict] = []
    pixel_counts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for label_path in pixel_labels:
        name = label_path.name
        stem = name[:-len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem
        label = np.asanyarray(nib.load(str(label_path)).dataobj) > 0.5
        scan_path = data_dir / cases_dir_name / name
        scan = np.asarray(nib.load(str(scan_path)).dataobj, dtype=np.float32) if scan_path.is_file() else \
            np.zeros(label.shape, dtype=np.float32)
        sample_txt = label_root / "sample" / f"{name}.txt"
        try:
            sample_label = int(float(sample_txt.read_text().split()[0]) > 0.5)
        except Exception:
            sample_label = int(label.any())
        case = {"case": name, "sample_label": sample_label, "anomalous_voxels": int(np.count_nonzero(label)),
                "kinds": kinds.get(name, ["normal"] if not sample_label else [])}
        prediction, status = None, "no pixel predictions"
        if pixel_dir is not None:
            prediction, status = _read_prediction(pixel_dir / name, label.shape)
            if prediction is None:
                pixel_counts[name] = _zero_counts(label)
            else:
                pos, neg, _ = float16_bin_counts(prediction, label)
                pixel_counts[name] = (pos, neg)
                case["pixel"] = count_metrics(pos, neg)
        case["pixel_status"] = status
        if prediction is not None:
            point = np.unravel_index(int(np.argmax(prediction)), prediction.shape)
            case["max_score"] = float(prediction[point])
        else:
            point = tuple(n // 2 for n in label.shape)
        case["point"] = [int(p) for p in point]
        if sample is not None and name + ".txt" in sample:
            entry = sample[name + ".txt"]
            case["sample_score"] = float(entry["score"])
            case["sample_status"] = entry["status"]
        score = fmt_metric(case.get("sample_score")) if "sample_score" in case else "n/a"
        kind_text = ", ".join(case["kinds"]) or "unknown"
        caption = f"{name} | sample score {score} | label {sample_label} | {kind_text}"
        case["image"] = _case_figure(scan, label, prediction, point, caption, output_dir / f"case_{stem}.png")
        case["png"] = f"case_{stem}.png"
        del scan, label, prediction
        cases.append(case)

    # groups: overall, then per anomaly kind (its cases plus all normal cases)
    present = sorted({k for c in cases if c["sample_label"] for k in c["kinds"] if k != "normal"})
    normal = [c["case"] for c in cases if not c["sample_label"]]
    groups = [("overall", [c["case"] for c in cases])]
    groups += [(kind, [c["case"] for c in cases if c["sample_label"] and kind in c["kinds"]] + normal)
               for kind in present]
    rows = []
    pixel_curve = sample_curve = None
    for group, names in groups:
        row = {"group": group, "n_cases": len(names), "n_anomalous": sum(1 for c in cases
                                                                         if c["case"] in names and c["sample_label"])}
        if pixel_dir is not None:
            pos = sum(pixel_counts[n][0] for n in names)
            neg = sum(pixel_counts[n][1] for n in names)
            row["pixel"] = count_metrics(pos, neg)
            if group == "overall":
                pixel_curve = pr_curve_from_counts(pos, neg)
        if sample is not None:
            chosen = [sample[n + ".txt"] for n in names if n + ".txt" in sample]
            labels, scores = [c["label"] for c in chosen], [c["score"] for c in chosen]
            row["sample"] = _score_metrics(labels, scores)
            if group == "overall" and sum(labels) > 0:
                precision, recall, _ = precision_recall_curve(labels, scores)
                sample_curve = (recall[::-1], precision[::-1])
        rows.append(row)
    overall = rows[0]
    pr_image = _pr_figure(pixel_curve, sample_curve, overall.get("pixel", {}).get("average_precision"),
                          overall.get("sample", {}).get("average_precision"), output_dir / "precision_recall.png")

    html_path = output_dir / "report.html"
    html_path.write_text(_html(title, data_dir, pixel_dir, sample_dir, cases, rows, pr_image, seconds_per_case))
    summary = {"title": title, "data_dir": str(data_dir), "pixel_dir": str(pixel_dir) if pixel_dir else None,
               "sample_dir": str(sample_dir) if sample_dir else None, "n_cases": len(cases),
               "seconds_per_case": seconds_per_case, "metrics": rows,
               "cases": [{k: v for k, v in c.items() if k != "image"} for c in cases]}
    (output_dir / "report.json").write_text(json.dumps(summary, indent=1) + "\n")
    return html_path


def _html(title, data_dir, pixel_dir, sample_dir, cases, rows, pr_image, seconds_per_case) -> str:
    e = html.escape
    has_pixel, has_sample = pixel_dir is not None, sample_dir is not None
    head = ["group", "cases", "anomalous"]
    head += ["pixel AP", "pixel AUROC"] if has_pixel else []
    head += ["sample AP", "sample AUROC"] if has_sample else []
    table = ["<table class='metrics'>", "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for row in rows:
        cls = "overall" if row["group"] == "overall" else "kind"
        cells = [e(row["group"]), str(row["n_cases"]), str(row["n_anomalous"])]
        for level, present in (("pixel", has_pixel), ("sample", has_sample)):
            if present:
                cells += [fmt_metric(row[level]["average_precision"]), fmt_metric(row[level]["auroc"])]
        table.append(f"<tr class='{cls}' data-group='{e(row['group'])}'>"
                     + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    table.append("</table>")
    run = f"<p>Cases: {len(cases)}.</p>"
    if seconds_per_case is not None:
        run = (f"<p class='runtime'>Cases: {len(cases)}; run time {seconds_per_case:.2f} s per case "
               f"({seconds_per_case * len(cases):.1f} s in all).</p>")
    items = []
    for c in cases:
        score = fmt_metric(c["sample_score"]) if "sample_score" in c else "n/a"
        pixel = c.get("pixel", {})
        details = (f"sample score {score}, sample label {c['sample_label']}, anomaly kinds: "
                   f"{e(', '.join(c['kinds']) or 'unknown')}; anomalous voxels {c['anomalous_voxels']}; "
                   f"pixel AP {fmt_metric(pixel.get('average_precision'))}; pixel map: {e(c['pixel_status'])}; "
                   f"slices through voxel {tuple(c['point'])}")
        items.append(f"<div class='case' data-case='{e(c['case'])}'><h3>{e(c['case'])}</h3>"
                     f"<img alt='{e(c['case'])}' src='{c['image']}'><p>{details}</p></div>")
    style = ("body{font-family:sans-serif;margin:1.5em;max-width:70em}table{border-collapse:collapse}"
             "td,th{border:1px solid #999;padding:2px 8px;text-align:right}td:first-child{text-align:left}"
             "tr.overall{font-weight:bold}.case{margin-bottom:1.2em}.case p{font-size:0.85em;margin:0}")
    return "\n".join([
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{e(title)}</title>",
        f"<style>{style}</style></head><body>", f"<h1>{e(title)}</h1>",
        f"<p>Data: {e(str(data_dir))}<br>Pixel predictions: {e(str(pixel_dir) if has_pixel else 'none')}<br>"
        f"Sample predictions: {e(str(sample_dir) if has_sample else 'none')}</p>",
        run, "<h2>Average precision and AUROC</h2>",
        "<p>Per anomaly kind: the cases of that kind plus all normal cases; pixel level pooled over their voxels, "
        "sample level over their scores. Predictions clipped to [0, 1], NaN and missing as 0 (as evaluate.py).</p>",
        *table, "<h2>Precision-recall curves</h2>", f"<img alt='precision-recall' src='{pr_image}'>",
        "<h2>Cases</h2>",
        "<p>Anomaly map overlaid (inferno, semi-transparent), ground-truth outline in cyan; slices through the "
        "map's maximum (the centre without a map).</p>",
        *items, "</body></html>", ""])


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="MOOD-layout dataset folder (holds toy/, toy_label/)")
    parser.add_argument("--pixel_dir", default=None, help="folder of <case>.nii.gz anomaly maps")
    parser.add_argument("--sample_dir", default=None, help="folder of <case>.nii.gz.txt scores")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--title", default=DEFAULT_TITLE)
    parser.add_argument("--seconds_per_case", type=float, default=None)
    parser.add_argument("--cases_dir_name", default="toy")
    args = parser.parse_args(argv)
    path = write_report(args.data_dir, args.pixel_dir, args.sample_dir, args.output_dir, title=args.title,
                        seconds_per_case=args.seconds_per_case, cases_dir_name=args.cases_dir_name)
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    main()
