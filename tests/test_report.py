"""The HTML report: with labels (AP table equal to evaluate.py, one entry per case) and without (a plain folder of
scans: the worklist by score with flags and thresholds from scores.csv, failed and missing cases), self-contained,
slices of at least 300 px with orientation letters that follow the affine, display windows, one-line errors, and
the page in headless Chromium when one is installed."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from scripts.evaluate import evaluate
from tools.report import (
    MIN_PANEL_WIDTH,
    THRESHOLD_COLOUR,
    display_window,
    fmt_metric,
    main,
    read_scores_csv,
    write_report,
)
from tools.toy_data import write_toy_dataset

ROOT = Path(__file__).resolve().parents[1]
N_TOY = 6
SIDE = 24
COLUMNS = ["name", "source", "series_uid", "status", "reason", "sample_score", "flag_fpr", "sample_threshold",
           "flagged", "map_max", "max_x_mm", "max_y_mm", "max_z_mm", "voxel_fpr", "voxel_threshold",
           "volume_above_ml", "seconds", "an_extra_column"]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "bundle"), str(ROOT)]), MPLBACKEND="Agg")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.report", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=300)


def _slices(text: str) -> list[dict]:
    """The slice images of a report: their HTML size and their decoded PNG."""
    out = []
    for match in re.finditer(r"<div class='slice'[^>]*><img alt='([^']*)' src='data:image/png;base64,([^']+)' "
                             r"width='(\d+)' height='(\d+)'>(.*?)</div>", text):
        png = Image.open(io.BytesIO(base64.b64decode(match.group(2))))
        letters = dict(re.findall(r"<span class='o (\w)'>(\w)</span>", match.group(5)))
        out.append({"alt": match.group(1), "width": int(match.group(3)), "height": int(match.group(4)),
                    "png": np.asarray(png.convert("RGB")), "letters": letters})
    return out


def _assert_self_contained(text: str) -> None:
    assert not re.search(r"""src\s*=\s*["'](?!data:)""", text)  # every image embedded
    assert not re.search(r"""href\s*=\s*["'](?!#)""", text)  # links only within the page
    assert "http" not in text and "<script" not in text and "<link" not in text


def _assert_unique_headings(text: str) -> None:
    headings = re.findall(r"<h([12])>(.*?)</h\1>", text)
    assert len(headings) == len(set(headings)) and sum(1 for level, _ in headings if level == "1") == 1


# --------------------------------------------------------------------------------------------- with labels
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    write_toy_dataset(root, "brain", n_train=1, n_toy=N_TOY, size=32, seed=0)
    data = root / "brain"
    pixel, sample = root / "pred" / "pixel", root / "pred" / "sample"
    pixel.mkdir(parents=True)
    sample.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for path in sorted((data / "toy_label" / "pixel").iterdir()):
        img = nib.load(str(path))
        mask = np.asarray(img.dataobj, dtype=np.float32)
        pred = ndi.gaussian_filter(mask, 1.0) + 0.1 * rng.random(mask.shape, dtype=np.float32)
        nib.save(nib.Nifti1Image(np.clip(pred, 0, 1).astype(np.float32), img.affine), pixel / path.name)
        label = float((data / "toy_label" / "sample" / f"{path.name}.txt").read_text())
        score = float(np.clip(label * 0.6 + 0.5 * rng.random(), 0, 1))
        (sample / f"{path.name}.txt").write_text(f"{score}\n")
    return data, pixel, sample


def test_report_html(dataset, tmp_path):
    data, pixel, sample = dataset
    path = write_report(data, pixel, sample, output_dir=tmp_path / "out", title="toy report", seconds_per_case=1.5)
    text = path.read_text()
    assert path.is_file() and path.suffix == ".html"
    _assert_self_contained(text)
    _assert_unique_headings(text)
    # three slices per case and the precision-recall curves, all embedded
    assert text.count("data:image/png;base64,") == 3 * N_TOY + 1
    # one entry per case, with kinds from anomalies.json
    meta = json.loads((data / "toy_label" / "anomalies.json").read_text())["cases"]
    assert text.count("<div class='case") == N_TOY
    for name in meta:
        assert f"data-case='{name}'" in text
    # overall AP and AUROC equal evaluate.py's
    ev_pixel, ev_sample = evaluate(data, pixel, "pixel"), evaluate(data, sample, "sample")
    overall = re.search(r"<tr class='overall'[^>]*>(.*?)</tr>", text).group(1)
    cells = re.findall(r"<td>(.*?)</td>", overall)
    assert cells[:3] == ["overall", str(N_TOY), str(ev_sample["n_positive_cases"])]
    assert cells[3:] == [fmt_metric(ev_pixel["average_precision"]), fmt_metric(ev_pixel["auroc"]),
                         fmt_metric(ev_sample["average_precision"]), fmt_metric(ev_sample["auroc"])]
    # a row per anomaly kind present, pooling that kind's cases and the normal cases
    kinds = sorted({k for c in meta.values() if c["label"] for k in c["kinds"]})
    assert kinds
    groups = re.findall(r"<tr class='kind' data-group='([^']*)'>", text)
    assert groups == kinds
    n_normal = sum(1 for c in meta.values() if not c["label"])
    for kind in kinds:
        row = re.search(rf"data-group='{kind}'>(.*?)</tr>", text).group(1)
        n_kind = sum(1 for c in meta.values() if c["label"] and kind in c["kinds"])
        assert re.findall(r"<td>(.*?)</td>", row)[1] == str(n_kind + n_normal)
    assert "1.50 s per case" in text
    # the summary is a table, not JSON; the worklist is sorted by score and carries the labels
    assert "<table class='summary'>" in text and "{&quot;" not in text and '{"' not in text
    scores = {c["case"][:-4]: c["score"] for c in ev_sample["cases"]}
    order = re.findall(r"<tr class='[^']*' data-case='([^']*)'>", text)
    assert order == sorted(scores, key=lambda n: -scores[n])
    assert "No scores.csv: no thresholds" in text
    # ground-truth outline drawn (cyan) on an anomalous case's slices, none on a normal case's
    views = {v["alt"]: v for v in _slices(text)}
    cyan = lambda img: int(np.all(img == (0, 255, 255), axis=-1).sum())  # noqa: E731
    anomalous = next(n for n, c in meta.items() if c["label"])
    normal = next(n for n, c in meta.items() if not c["label"])
    assert sum(cyan(views[f"{anomalous} {v}"]["png"]) for v in ("sagittal", "coronal", "axial")) > 0
    assert sum(cyan(views[f"{normal} {v}"]["png"]) for v in ("sagittal", "coronal", "axial")) == 0
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    assert summary["n_cases"] == N_TOY and summary["metrics"][0]["group"] == "overall"


def test_report_cli_without_pixel_predictions(dataset, tmp_path, capsys):
    data, _, sample = dataset  # in this process: with labels the report imports scripts.evaluate (torch, MONAI)
    main(["--data_dir", str(data), "--sample_dir", str(sample), "--output_dir", str(tmp_path / "cli")])
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"report: {tmp_path / 'cli' / 'report.html'}"
    text = (tmp_path / "cli" / "report.html").read_text()
    assert text.count("<div class='case") == N_TOY
    assert "pixel AP</th>" not in text and "sample AP</th>" in text
    assert "no map: slices through the centre" in text


def test_report_from_the_scans_folder_finds_the_labels_beside_it(dataset, tmp_path):
    data, pixel, _ = dataset
    text = write_report(data / "toy", pixel, None, output_dir=tmp_path / "out").read_text()
    assert "pixel AP</th>" in text and "(labels: " in text


# ---------------------------------------------------------------------------------------- without labels
def _scan(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, SIDE)] * 3, indexing="ij"))
    body = (grid ** 2).sum(0) < 0.8
    return np.where(body, 100 + 20 * rng.standard_normal(body.shape), 0).astype(np.float32)


def _blob(centre, amplitude: float) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(SIDE)] * 3, indexing="ij"))
    r2 = ((grid - np.asarray(centre, dtype=float)[:, None, None, None]) ** 2).sum(0)
    return (amplitude * np.exp(-r2 / (2 * 2.0 ** 2))).astype(np.float32)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)


# scan name -> peak of its map (None: failed in the worklist; "missing": no prediction at all)
PLAIN = {"a.nii.gz": 0.30, "b.nii.gz": 0.90, "c.nii": 0.65, "d.nii.gz": None, "e.nii.gz": "missing",
         "f.nii.gz": 0.10}
SAMPLE_THRESHOLD, VOXEL_THRESHOLD = 0.5, 0.4


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A plain folder of tiny scans (no labels) and an inference output folder with maps, scores and
    scores.csv: one failed case and one without any prediction."""
    root = tmp_path_factory.mktemp("plain")
    scans, pred = root / "scans", root / "pred"
    scans.mkdir()
    pred.mkdir()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    rows = []
    for i, (name, peak) in enumerate(PLAIN.items()):
        nib.save(nib.Nifti1Image(_scan(i), affine), scans / name)
        common = {"name": name, "source": name, "flag_fpr": "0.0500", "sample_threshold": f"{SAMPLE_THRESHOLD:.6f}",
                  "voxel_fpr": "0.001000", "voxel_threshold": f"{VOXEL_THRESHOLD:.6f}", "an_extra_column": "?"}
        if peak == "missing":
            continue
        if peak is None:
            rows.append({**common, "status": "failed", "reason": "unreadable scan: truncated gzip stream",
                         "flagged": "yes"})
            continue
        centre = (6 + 2 * i, 12, 12)
        heat = _blob(centre, peak)
        nib.save(nib.Nifti1Image(heat, affine), pred / name)
        score = peak * 0.9
        (pred / f"{name}.txt").write_text(f"{score}\n")
        location = affine @ np.array([*centre, 1.0])
        rows.append({**common, "status": "ok", "sample_score": f"{score:.6f}",
                     "flagged": "yes" if score > SAMPLE_THRESHOLD else "no", "map_max": f"{peak:.6f}",
                     "max_x_mm": f"{location[0]:.1f}", "max_y_mm": f"{location[1]:.1f}",
                     "max_z_mm": f"{location[2]:.1f}", "seconds": "1.5",
                     "volume_above_ml": f"{(heat > VOXEL_THRESHOLD).sum() * 8e-3:.3f}"})
    _write_csv(pred / "scores.csv", rows)
    return scans, pred


def _worklist(text: str) -> list[tuple[str, str, list[str]]]:
    table = re.search(r"<table class='worklist'>(.*?)</table>", text, re.S).group(1)
    return [(cls, name, re.findall(r"<td[^>]*>(.*?)</td>", body))
            for cls, name, body in re.findall(r"<tr class='([^']*)' data-case='([^']*)'>(.*?)</tr>", table)]


def test_plain_folder_with_a_worklist(plain, tmp_path):
    scans, pred = plain
    out = _cli("--input", str(scans), "--pred", str(pred), "--output_dir", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "r" / "report.html").read_text()
    _assert_self_contained(text)
    _assert_unique_headings(text)
    assert "Average precision" not in text and "(no labels)" in text
    rows = _worklist(text)
    # sorted by score, highest first; then the case without a prediction; the failed case last
    assert [name for _, name, _ in rows] == ["b.nii.gz", "c.nii", "a.nii.gz", "f.nii.gz", "e.nii.gz", "d.nii.gz"]
    ranks = [cells[0] for _, _, cells in rows]
    assert ranks[:4] == ["1", "2", "3", "4"] and ranks[4:] == ["\u2014", "\u2014"]
    scores = [cells[2] for _, _, cells in rows]
    assert scores[:4] == [f"{p * 0.9:.4f}" for p in (0.90, 0.65, 0.30, 0.10)]  # 4 decimals, not 16 digits
    # flagged rows highlighted: the two above the threshold and the failed one (a scan that could not be scored)
    flagged = [name for cls, name, _ in rows if "flagged" in cls.split()]
    assert flagged == ["b.nii.gz", "c.nii", "d.nii.gz"]
    cells = dict((name, c) for _, name, c in rows)
    assert cells["b.nii.gz"][3] == "yes" and cells["a.nii.gz"][3] == "no"
    assert "failed: unreadable scan: truncated gzip stream" in cells["d.nii.gz"][4]
    assert cells["e.nii.gz"][4].startswith("missing prediction")
    assert cells["b.nii.gz"][5] == "0.900" and cells["b.nii.gz"][6].startswith("(")
    # thresholds in the summary and on the colour bars
    assert "sample score &gt; 0.5000 (false-positive rate 5 % on normal scans)" in text
    assert "0.4000 (false-positive rate 0.1 % of normal voxels)" in text
    assert "3 of 6 (including 1 failed" in text
    assert text.count("thr 0.400</text>") == 4  # one per case with a map
    # every slice at least 300 px wide, drawn at the size it was rendered, with four orientation letters
    views = _slices(text)
    assert views and len(views) % 3 == 0
    for view in views:
        assert view["width"] >= MIN_PANEL_WIDTH and view["png"].shape[:2] == (view["height"], view["width"])
        assert sorted(view["letters"]) == ["b", "l", "r", "t"]
    # the region above the voxel threshold outlined where the map exceeds it, nowhere in a weak map
    outline = lambda name: sum(int(np.all(v["png"] == THRESHOLD_COLOUR, axis=-1).sum())  # noqa: E731
                               for v in views if v["alt"].startswith(name))
    assert outline("b.nii.gz") > 0 and outline("f.nii.gz") == 0


def test_plain_folder_without_a_worklist(plain, tmp_path):
    scans, pred = plain
    bare = tmp_path / "pred"
    bare.mkdir()
    for path in pred.iterdir():
        if path.name != "scores.csv":
            (bare / path.name).write_bytes(path.read_bytes())
    text = write_report(scans, bare, bare, output_dir=tmp_path / "r", max_views=2).read_text()
    assert text.count("No scores.csv: no thresholds") == 1
    rows = _worklist(text)
    assert [name for _, name, _ in rows][:4] == ["b.nii.gz", "c.nii", "a.nii.gz", "f.nii.gz"]
    assert not any("flagged" in cls for cls, _, _ in rows)
    # without the worklist, the failed case is just a case without a prediction
    assert {name for _, name, c in rows if c[4].startswith("missing prediction")} == {"d.nii.gz", "e.nii.gz"}
    # the map's maximum and its location read from the map itself
    b = next(c for _, name, c in rows if name == "b.nii.gz")
    assert b[5] == "0.900" and b[6] == "(16.0, 24.0, 24.0)"
    assert text.count("<div class='case") == 2 and "Views of the 2 highest-ranked of 6 cases" in text


def test_read_scores_csv_tolerates_extra_columns_and_empty_fields(tmp_path):
    path = tmp_path / "scores.csv"
    _write_csv(path, [{"name": "x.nii.gz", "status": "ok", "sample_score": "0.123456", "flagged": "",
                       "max_x_mm": "1.0", "max_y_mm": "2.0", "max_z_mm": "", "an_extra_column": "1"}])
    (row,) = read_scores_csv(path)
    assert row["score"] == pytest.approx(0.123456) and row["flagged"] is None and row["location_mm"] is None
    assert row["sample_threshold"] is None and row["status"] == "ok"


# ------------------------------------------------------------------------------------ orientation, window
@pytest.mark.parametrize("storage", ["RAS", "LPS", "permuted"])
def test_orientation_letters_follow_the_affine(storage, tmp_path):
    """A bright blob on the patient's right shows on the viewer's left of the axial and coronal views, under the
    letter R, however the file stores its axes."""
    affine = {"RAS": np.diag([2.0, 2.0, 2.0, 1.0]), "LPS": np.diag([-2.0, -2.0, 2.0, 1.0]),
              "permuted": np.array([[0, 0, 2.0, 0], [2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]])}[storage]
    codes = nib.orientations.aff2axcodes(affine)
    # the voxel index nearest the patient's right along the axis that maps to R/L
    right_axis = next(i for i, c in enumerate(codes) if c in "RL")
    centre = [SIDE // 2] * 3
    centre[right_axis] = SIDE - 5 if codes[right_axis] == "R" else 4
    scan = _scan(0) + 200 * _blob(centre, 1.0)
    scans, pred = tmp_path / "scans", tmp_path / "pred"
    scans.mkdir()
    pred.mkdir()
    nib.save(nib.Nifti1Image(scan, affine), scans / "s.nii.gz")
    nib.save(nib.Nifti1Image(_blob(centre, 0.02), affine), pred / "s.nii.gz")  # its peak there, not drawn (< 0.05)
    text = write_report(scans, pred, pred, output_dir=tmp_path / "r", window=(0.0, 200.0)).read_text()
    assert f"file axes {''.join(codes)}" in text
    views = {v["alt"].split()[-1]: v for v in _slices(text)}
    for name in ("axial", "coronal"):
        view = views[name]
        assert view["letters"]["l"] == "R" and view["letters"]["r"] == "L"
        grey = view["png"][..., 0].astype(float)
        columns = np.nonzero(grey >= 250)[1]
        assert columns.size and columns.mean() < view["width"] / 2
    assert views["axial"]["letters"]["t"] == "A" and views["coronal"]["letters"]["t"] == "S"
    assert views["sagittal"]["letters"] == {"l": "A", "r": "P", "t": "S", "b": "I"}


def test_display_window():
    hu = np.full((8, 8, 8), -1000.0, dtype=np.float32)
    hu[2:6, 2:6, 2:6] = 40.0
    lo, hi, text = display_window(hu, "auto")
    assert (lo, hi) == (-160.0, 240.0) and "W 400 / L 40 HU" in text
    scaled = (hu + 1024) / 4095  # CT in [0, 1]: MOOD's mapping is unknown, so a percentile window
    lo, hi, text = display_window(scaled, "ct")
    assert 0 <= lo < hi <= 1 and "percentile" in text and "MOOD does not publish" in text
    lo, hi, text = display_window(scaled, "auto", hint="mr")
    assert text.startswith("MR: percentile")
    assert display_window(hu, "mr", window=(-50.0, 50.0))[:2] == (-50.0, 50.0)


def test_ct_folder_gets_the_soft_tissue_window(tmp_path):
    scans, pred = tmp_path / "abdom", tmp_path / "pred"
    scans.mkdir()
    pred.mkdir()
    volume = np.where(_scan(3) > 0, 40.0, -1000.0).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), scans / "ct.nii.gz")
    (pred / "ct.nii.gz.txt").write_text("0.5\n")
    text = write_report(scans, pred, pred, output_dir=tmp_path / "r").read_text()
    assert "CT soft-tissue window W 400 / L 40 HU" in text
    axial = _slices(text)[2]["png"][..., 0]
    assert 100 <= int(np.median(axial[axial > 0])) <= 150  # 40 HU is mid-grey in W 400 / L 40


def _write_dicom_series(folder: Path, volume: np.ndarray, uid: str, prefix: str) -> None:
    """``volume`` (columns, rows, slices) in HU as a CT series of int16 slices (stored value = HU + 1024)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID, uid
        ds.Modality, ds.InstanceNumber = "CT", volume.shape[2] - k  # written in reverse order
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (volume[:, :, volume.shape[2] - 1 - k].T + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"{prefix}{k:03d}.dcm", enforce_file_format=True)


def test_a_dicom_series_is_shown_under_its_map(tmp_path):
    """A series (among another in the same folder) read slice by slice in InstanceNumber order onto the map's grid,
    in HU, so the soft-tissue window applies and the bright spot lies under the map's maximum."""
    scans, pred = tmp_path / "in", tmp_path / "pred"
    (scans / "patient1").mkdir(parents=True)
    pred.mkdir()
    volume = np.where(_scan(5) > 0, 40.0, -1000.0).astype(np.float32)[:, :, :8]
    centre = (6, 12, 1)
    volume[5:8, 11:14, 0:3] = 1000.0  # near the first slices: found only in InstanceNumber order
    _write_dicom_series(scans / "patient1", volume, "1.2.3.4", "a")
    _write_dicom_series(scans / "patient1", np.full_like(volume, 500.0), "1.2.3.5", "b")
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])  # LPS to RAS, as the inference writes a series' map
    name = "patient1_S1.nii.gz"
    nib.save(nib.Nifti1Image(_blob(centre, 0.04)[:, :, :8], affine), pred / name)  # peak there, not drawn
    _write_csv(pred / "scores.csv", [{"name": name, "source": "patient1", "series_uid": "1.2.3.4", "status": "ok",
                                      "sample_score": "0.700000"}])
    text = write_report(scans, pred, pred, output_dir=tmp_path / "r").read_text()
    assert "not shown" not in text and "differs" not in text and "CT soft-tissue window" in text
    assert "<span class='src'>patient1</span>" in text
    axial = next(v for v in _slices(text) if v["alt"].endswith("axial"))
    assert np.all(axial["png"] == 255, axis=-1).sum() > 100  # the slice through the maximum holds the 1000 HU cube
    assert "axial, z = 3.0 mm (slice 2 of 8)" in text


# -------------------------------------------------------------------------------------------------- errors
def test_bad_inputs_are_one_line_naming_the_folder(plain, tmp_path):
    scans, pred = plain
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, expected in (([str(tmp_path / "nope"), str(pred)], f"input folder {tmp_path / 'nope'} does not exist"),
                           ([str(scans), str(tmp_path / "nopred")],
                            f"predictions folder {tmp_path / 'nopred'} does not exist"),
                           ([str(empty), str(empty)], f"input folder {empty} holds no scans")):
        out = _cli("--input", args[0], "--pred", args[1], "--output_dir", str(tmp_path / "r"))
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert out.stderr.strip().splitlines() == [f"report: {expected} (*.nii.gz, *.nii)"
                                                   if "no scans" in expected else f"report: {expected}"]
    assert not (tmp_path / "r" / "report.html").exists()


def test_a_label_without_scan_or_prediction_is_shown_not_a_crash(dataset, tmp_path):
    data, pixel, sample = dataset
    partial = tmp_path / "pred"
    partial.mkdir()
    names = sorted(p.name for p in (data / "toy").iterdir())
    for path in sorted(pixel.iterdir())[:3] + sorted(sample.iterdir())[:3]:
        (partial / path.name).write_bytes(path.read_bytes())
    text = write_report(data, partial, partial, output_dir=tmp_path / "r").read_text()
    rows = _worklist(text)
    assert sorted(name for _, name, _ in rows) == names
    missing = [name for _, name, c in rows if c[4].startswith("missing prediction")]
    assert len(missing) == 3
    ev = evaluate(data, partial, "pixel")
    overall = re.findall(r"<td>(.*?)</td>", re.search(r"<tr class='overall'[^>]*>(.*?)</tr>", text).group(1))
    assert overall[3] == fmt_metric(ev["average_precision"])


# ------------------------------------------------------------------------------------------------ browser
def test_report_in_a_real_browser(plain, tmp_path):
    from tools.report_screenshot import check_report, find_chromium, measure

    if find_chromium() is None:
        pytest.skip("no chromium binary (apt-get install -y chromium)")
    scans, pred = plain
    html_path = write_report(scans, pred, pred, output_dir=tmp_path / "r")
    result = check_report(html_path, tmp_path / "shots", width=1400, height=3000)
    assert result["problems"] == []
    assert Path(result["screenshot"]).is_file() and result["blank_fraction"] < 0.95
    numbers = result["measurements"]
    assert numbers["scrollWidth"] <= numbers["clientWidth"] <= 1400
    slices = [i for i in numbers["images"] if i["slice"]]
    assert len(slices) == result["n_slices"] == 3 * 6
    assert all(i["width"] >= MIN_PANEL_WIDTH and i["width"] == i["naturalWidth"] for i in slices)
    # the check can fail: a page wider than the window is caught
    wide = tmp_path / "wide.html"
    wide.write_text(html_path.read_text().replace("<h1>", "<div style='width:2400px'>wide</div><h1>", 1))
    numbers = measure(wide, width=1400, height=1000)
    assert numbers["scrollWidth"] > numbers["clientWidth"]


# ---------------------------------------------------------------------------------------------- 2D images
def _picture(seed: int, rows: int, columns: int) -> np.ndarray:
    """A smooth radiograph-like picture in [0, 1], row-major (rows, columns), with dark air in its four leftmost
    columns (as tests/test_radiographs.py makes them)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:rows, :columns] / max(rows, columns)
    image = 0.3 + 0.4 * np.exp(-((x - 0.5) ** 2 + (y - 0.6) ** 2) * 4)
    image = np.clip(image + 0.1 * ndi.gaussian_filter(rng.standard_normal((rows, columns)), 2), 0.05, 1)
    image[:, :4] = 0
    return image


def _write_png(path: Path, image: np.ndarray) -> None:
    Image.fromarray((image * 65535).round().astype(np.uint16)).save(path)


def _write_dicom(path: Path, image: np.ndarray) -> None:
    """A single-image DX DICOM of ``image`` (rows, columns) in [0, 1] as 12-bit values, whatever ``path``'s name."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = generate_uid(), ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "DX", "MONOCHROME2", 1
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.7, 0.7]
    ds.PixelData = (image * 4095).round().astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _map_2d(columns: int, rows: int, spot: tuple[int, int] | None, peak: float, floor: float = 0.02) -> np.ndarray:
    """A map as the bundle writes it, (columns, rows): ``floor`` (below the drawn 0.05) with a Gaussian hot spot of
    height ``peak`` at ``spot`` = (column, row) of the picture."""
    values = np.full((columns, rows), floor, dtype=np.float32)
    if spot is not None:
        c, r = np.mgrid[:columns, :rows]
        values = np.maximum(values, peak * np.exp(-((c - spot[0]) ** 2 + (r - spot[1]) ** 2) / (2 * 2.0 ** 2)))
    return values.astype(np.float32)


def _save_2d(path: Path, values: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(values, np.diag([0.7, 0.7, 1.0, 1.0])), path)


def _coloured(view: dict) -> np.ndarray:
    """Where the map is drawn over the grey image: pixels that are not grey, outlines left out."""
    png = view["png"].astype(int)
    outline = np.all(png == THRESHOLD_COLOUR, axis=-1) | np.all(png == (0, 255, 255), axis=-1)
    return (png.max(axis=-1) - png.min(axis=-1) > 40) & ~outline


def _centre(mask: np.ndarray, view: dict, shape: tuple[int, int]) -> tuple[float, float]:
    """The centroid of ``mask`` in the picture's (column, row) pixels; ``shape`` = (columns, rows)."""
    rows, columns = np.nonzero(mask)
    assert rows.size, "nothing drawn"
    return ((columns.mean() + 0.5) * shape[0] / view["width"] - 0.5, (rows.mean() + 0.5) * shape[1] / view["height"]
            - 0.5)


def _expected_grey(path: Path) -> np.ndarray:
    """The image as the bundle preprocesses it, in display order (rows, columns), 0-255."""
    from monai.transforms import LoadImage

    from scripts.io.radiographs import RadiographReader
    from scripts.transforms import RadiographIntensity

    image = LoadImage(reader=RadiographReader(), image_only=True, ensure_channel_first=True)(str(path))
    return (np.asarray(RadiographIntensity()(image))[0].T + 1) * 127.5


# file -> (output name, (rows, columns), (column, row) of the map's hot spot or None, map peak; None: failed)
RADIOGRAPHS = {"a.dcm": ("a.nii.gz", (36, 52), (44, 8), 0.90),  # landscape; the picture's top right
               "a.png": ("a_png.nii.gz", (48, 40), (9, 38), 0.70),  # portrait; bottom left (a.dcm took "a")
               "b.png": ("b.nii.gz", (48, 40), (30, 12), 0.30),
               "broken.png": ("broken.nii.gz", None, None, None),  # not a PNG: failed in the worklist
               "chest": ("chest.nii.gz", (48, 40), None, 0.10)}  # a DICOM by content; its map below 0.05 anywhere


@pytest.fixture(scope="module")
def radiographs(tmp_path_factory):
    """A folder of 2D images (PNG, DICOM with and without a suffix, a broken file; no labels) and an inference
    output folder as the bundle writes it for xray.yaml: maps in (columns, rows), .txt scores, scores.csv."""
    from scripts.inference.worklist import WORKLIST_COLUMNS

    root = tmp_path_factory.mktemp("radiographs")
    scans, pred = root / "scans", root / "pred"
    scans.mkdir()
    pred.mkdir()
    rows = []
    for seed, (source, (name, shape, spot, peak)) in enumerate(RADIOGRAPHS.items()):
        common = {"name": name, "source": source, "flag_fpr": "0.0500", "sample_threshold": f"{SAMPLE_THRESHOLD:.6f}",
                  "voxel_fpr": "0.001000", "voxel_threshold": f"{VOXEL_THRESHOLD:.6f}"}
        if shape is None:
            (scans / source).write_bytes(b"not a png")
            rows.append({**common, "status": "failed", "reason": "not a readable PNG or JPEG image", "flagged": "yes"})
            continue
        image = _picture(seed, *shape)
        (_write_png if source.endswith(".png") else _write_dicom)(scans / source, image)
        values = _map_2d(shape[1], shape[0], spot, peak)
        _save_2d(pred / name, values)
        score = peak * 0.9
        (pred / f"{name}.txt").write_text(f"{score:.6f}\n")
        Image.new("RGB", (32, 32)).save(pred / f"{name[:-7]}_overlay.png")  # the bundle's overlay: not used
        rows.append({**common, "status": "ok", "sample_score": f"{score:.6f}",
                     "flagged": "yes" if score > SAMPLE_THRESHOLD else "no", "map_max": f"{values.max():.6f}",
                     "max_x_mm": "1.0", "max_y_mm": "2.0", "max_z_mm": "0.0", "seconds": "0.5"})
    with open(pred / "scores.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(WORKLIST_COLUMNS), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return scans, pred


def test_radiographs_without_labels(radiographs, tmp_path, capsys):
    scans, pred = radiographs
    main(["--input", str(scans), "--pred", str(pred), "--output_dir", str(tmp_path / "r")])
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"report: {tmp_path / 'r' / 'report.html'}"
    text = (tmp_path / "r" / "report.html").read_text()
    _assert_self_contained(text)
    _assert_unique_headings(text)
    assert "Average precision" not in text and "(no labels)" in text and "2D images (PNG, JPEG, DICOM)" in text
    assert "no orientation letters" in text and "radiological convention" not in text
    # the worklist: the cases named as the bundle names its outputs, in score order, flags from scores.csv
    rows = _worklist(text)
    assert [name for _, name, _ in rows] == ["a.nii.gz", "a_png.nii.gz", "b.nii.gz", "chest.nii.gz", "broken.nii.gz"]
    assert [name for cls, name, _ in rows if "flagged" in cls.split()] == ["a.nii.gz", "a_png.nii.gz",
                                                                           "broken.nii.gz"]
    assert [cells[0] for _, _, cells in rows] == ["1", "2", "3", "4", "\u2014"]
    cells = {name: c for _, name, c in rows}
    assert cells["a.nii.gz"][3] == "yes" and cells["b.nii.gz"][3] == "no"
    assert cells["broken.nii.gz"][4].startswith("failed: not a readable PNG")
    # a DICOM and a PNG case, both shown
    assert "<span class='src'>a.dcm</span>" in text and "<span class='src'>a.png</span>" in text
    # one view per case (none for the failed one), no letters, >= 300 px on the long side, the picture's aspect
    views = {v["alt"]: v for v in _slices(text)}
    assert sorted(views) == ["a.nii.gz image", "a_png.nii.gz image", "b.nii.gz image", "chest.nii.gz image"]
    assert text.count("<div class='case") == 4 and text.count("thr 0.400</text>") == 4
    shapes = {name: shape[::-1] for name, shape, _, _ in RADIOGRAPHS.values() if shape}  # (columns, rows)
    for alt, view in views.items():
        columns, rows_ = shapes[alt.split()[0]]
        assert view["letters"] == {} and view["png"].shape[:2] == (view["height"], view["width"])
        assert max(view["width"], view["height"]) >= 300 and view["width"] >= MIN_PANEL_WIDTH
        assert abs(view["width"] / view["height"] - columns / rows_) < 0.01
    assert (views["a.nii.gz image"]["width"], views["a.nii.gz image"]["height"]) == (340, 235)  # landscape
    assert (views["a_png.nii.gz image"]["width"], views["a_png.nii.gz image"]["height"]) == (300, 360)  # portrait
    # the hot spot drawn where the map peaks, in the picture's (column, row): a transposed view misplaces it
    for name, _, spot, _ in RADIOGRAPHS.values():
        if spot is None:
            continue
        view = views[f"{name} image"]
        column, row = _centre(_coloured(view), view, shapes[name])
        assert abs(column - spot[0]) < 1.5 and abs(row - spot[1]) < 1.5, (name, column, row)
        assert f"map maximum at column {spot[0] + 1}, row {spot[1] + 1}" in text
    # green outline above the voxel threshold (0.4) for the strong spots only
    green = lambda name: int(np.all(views[f"{name} image"]["png"] == THRESHOLD_COLOUR, axis=-1).sum())  # noqa: E731
    assert green("a.nii.gz") > 0 and green("a_png.nii.gz") > 0 and green("b.nii.gz") == 0 == green("chest.nii.gz")
    # the image itself as the bundle preprocesses it, rows top to bottom: the dark air in the leftmost columns
    chest = views["chest.nii.gz image"]
    assert not _coloured(chest).any()
    grey = chest["png"][..., 0].astype(float)
    expected = _expected_grey(scans / "chest")
    shrunk = np.asarray(Image.fromarray(grey.astype(np.float32)).resize(expected.shape[::-1], Image.Resampling.BOX))
    assert shrunk.shape == expected.shape == (48, 40)
    assert np.abs(shrunk - expected).mean() < 8
    assert grey[:, : chest["width"] * 3 // 40].mean() < grey[:, chest["width"] // 4:].mean() - 60


@pytest.fixture(scope="module")
def radiograph_dataset(tmp_path_factory):
    """A MOOD-like 2D dataset (toy/ PNG and DICOM images, toy_label/pixel 2D NIfTI masks in (columns, rows),
    toy_label/sample scores) and predictions without a worklist."""
    root = tmp_path_factory.mktemp("xray_labels")
    data, pred = root / "xray", root / "pred"
    for folder in (data / "toy", data / "toy_label" / "pixel", data / "toy_label" / "sample", pred):
        folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    # file -> (column, row) of the anomaly's square (None: normal), spot of a false alarm on a normal case
    cases = {"toy_0.png": (None, None), "toy_1.dcm": ((30, 10), None), "toy_2.png": ((8, 36), None),
             "toy_3": (None, (20, 20))}  # toy_3: a DICOM without a suffix
    anomalies = {}
    for seed, (source, (square, false_alarm)) in enumerate(cases.items()):
        rows, columns = 48, 40
        image = _picture(10 + seed, rows, columns)
        (_write_png if source.endswith(".png") else _write_dicom)(data / "toy" / source, image)
        name = f"{source.split('.')[0]}.nii.gz"
        mask = np.zeros((columns, rows), dtype=np.uint8)
        if square is not None:
            mask[square[0] - 3:square[0] + 4, square[1] - 3:square[1] + 4] = 1
            anomalies[name] = square
        _save_2d(data / "toy_label" / "pixel" / name, mask)
        (data / "toy_label" / "sample" / f"{name}.txt").write_text(f"{int(square is not None)}\n")
        values = np.clip(0.02 + 0.8 * ndi.gaussian_filter(mask.astype(np.float32), 1.0)
                         + 0.05 * rng.random(mask.shape), 0, 1).astype(np.float32)
        if false_alarm is not None:
            values = np.maximum(values, _map_2d(columns, rows, false_alarm, 0.6))
        _save_2d(pred / name, values)
        (pred / f"{name}.txt").write_text(f"{0.3 + 0.5 * (square is not None) + 0.1 * rng.random():.6f}\n")
    return data, pred, anomalies


def test_radiographs_with_labels(radiograph_dataset, tmp_path):
    data, pred, anomalies = radiograph_dataset
    text = write_report(data, pred, pred, output_dir=tmp_path / "r").read_text()
    _assert_self_contained(text)
    _assert_unique_headings(text)
    assert "No scores.csv: no thresholds" in text and "(labels: " in text
    # AP and AUROC as evaluate.py computes them on the same files
    ev_pixel, ev_sample = evaluate(data, pred, "pixel"), evaluate(data, pred, "sample")
    assert ev_pixel["n_cases"] == 4 and ev_pixel["n_missing"] == 0
    cells = re.findall(r"<td>(.*?)</td>", re.search(r"<tr class='overall'[^>]*>(.*?)</tr>", text).group(1))
    assert cells == ["overall", "4", "2", fmt_metric(ev_pixel["average_precision"]), fmt_metric(ev_pixel["auroc"]),
                     fmt_metric(ev_sample["average_precision"]), fmt_metric(ev_sample["auroc"])]
    overall = json.loads((tmp_path / "r" / "report.json").read_text())["metrics"][0]
    assert overall["pixel"]["average_precision"] == pytest.approx(ev_pixel["average_precision"], abs=1e-12)
    assert overall["sample"]["average_precision"] == pytest.approx(ev_sample["average_precision"], abs=1e-12)
    assert "precision-recall curves" in text
    # the worklist by score (from the .txt files), the labels beside it
    scores = {c["case"][:-4]: c["score"] for c in ev_sample["cases"]}
    rows = _worklist(text)
    assert [name for _, name, _ in rows] == sorted(scores, key=lambda n: -scores[n])
    assert {name: c[8] for _, name, c in rows} == {n: str(int(n in anomalies)) for n in scores}
    # one view per case; the ground truth outlined where the label lies in the picture, on the DICOM and the PNG
    views = {v["alt"]: v for v in _slices(text)}
    assert sorted(views) == [f"toy_{i}.nii.gz image" for i in range(4)]
    for name in scores:
        view = views[f"{name} image"]
        cyan = np.all(view["png"] == (0, 255, 255), axis=-1)
        assert max(view["width"], view["height"]) >= 300 and view["letters"] == {}
        if name not in anomalies:
            assert not cyan.any()
            continue
        column, row = _centre(cyan, view, (40, 48))
        assert abs(column - anomalies[name][0]) < 1 and abs(row - anomalies[name][1]) < 1, (name, column, row)
    # the false alarm on a normal DICOM drawn where its map peaks
    false_alarm = views["toy_3.nii.gz image"]
    column, row = _centre(_hot(false_alarm), false_alarm, (40, 48))
    assert abs(column - 20) < 1.5 and abs(row - 20) < 1.5


def _hot(view: dict) -> np.ndarray:
    """Where the overlay is drawn bright (the map well above the floor): inferno's upper half is red to yellow."""
    png = view["png"].astype(int)
    return (png[..., 0] - png[..., 2] > 60) & ~np.all(png == (0, 255, 255), axis=-1)


def test_a_folder_with_nifti_scans_is_read_as_volumes(tmp_path):
    scans, pred = tmp_path / "scans", tmp_path / "pred"
    scans.mkdir()
    pred.mkdir()
    nib.save(nib.Nifti1Image(_scan(0), np.eye(4)), scans / "v.nii.gz")
    _write_png(scans / "x.png", _picture(0, 48, 40))
    (pred / "v.nii.gz.txt").write_text("0.5\n")
    text = write_report(scans, pred, pred, output_dir=tmp_path / "r").read_text()
    assert [name for _, name, _ in _worklist(text)] == ["v.nii.gz"]
    assert "1 2D image file(s) beside the NIfTI scans left out" in text
    assert len(_slices(text)) == 3


def test_a_dicom_series_directly_in_the_input_folder_is_not_taken_for_radiographs(tmp_path):
    scans, pred = tmp_path / "in", tmp_path / "pred"
    scans.mkdir()
    pred.mkdir()
    volume = np.where(_scan(5) > 0, 40.0, -1000.0).astype(np.float32)[:, :, :6]
    _write_dicom_series(scans, volume, "1.2.3.4", "a")
    name = "S1.nii.gz"
    nib.save(nib.Nifti1Image(_blob((6, 12, 2), 0.5)[:, :, :6], np.diag([-2.0, -2.0, 3.0, 1.0])), pred / name)
    _write_csv(pred / "scores.csv", [{"name": name, "source": ".", "series_uid": "1.2.3.4", "status": "ok",
                                      "sample_score": "0.700000"}])
    text = write_report(scans, pred, pred, output_dir=tmp_path / "r").read_text()
    assert [name for _, name, _ in _worklist(text)] == [name]
    assert len(_slices(text)) == 3 and "not shown" not in text and "2D images" not in text


def test_radiographs_get_one_view_each_with_the_map_where_it_is(tmp_path):
    """2D images (xray.yaml's inputs, here the chest phantom with its labels): one view per
    case, at least 300 px, the picture's aspect; AP equal to evaluate.py; the map's hot spot drawn where it lies in
    the picture (a transposed view would put it elsewhere). An integration check with tools.xray_phantom, skipped
    without it: the 2D tests above build their own inputs."""
    phantom = pytest.importorskip("tools.xray_phantom")
    write_xray_dataset = getattr(phantom, "write_xray_dataset", None)
    if write_xray_dataset is None:
        pytest.skip("tools.xray_phantom has no write_xray_dataset")

    written = write_xray_dataset(tmp_path / "data", n_train=0, n_toy=4, seed=3, size=48)
    data = Path(written["root"])
    pred = tmp_path / "pred"
    pred.mkdir()
    for index, name in enumerate(sorted(written["cases"])):
        label = np.asarray(nib.load(data / "toy_label/pixel" / name).dataobj).astype(np.float32)
        values = 0.05 * np.ones_like(label)
        if index == 0:  # a normal case's map with a hot spot at column 40, row 8 (the picture's top right)
            values[38:43, 6:11] = 0.95
        values = np.maximum(values, 0.9 * label)
        nib.save(nib.Nifti1Image(values, np.eye(4)), pred / name)
        (pred / f"{name}.txt").write_text(f"{values.max():.6f}\n")
    html_path = write_report(data, pred, pred, tmp_path / "out")
    text = html_path.read_text()
    views = _slices(text)
    assert len(views) == 4 and all(v["letters"] == {} for v in views)  # one per case, no patient letters
    for view in views:
        assert max(view["width"], view["height"]) >= 300 and view["width"] == view["height"]  # 48 x 48
    official = evaluate(data, pred, "pixel")
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    overall = summary["metrics"][0]
    assert overall["group"] == "overall"
    assert overall["pixel"]["average_precision"] == pytest.approx(official["average_precision"], abs=1e-9)
    first = next(v for v in views if v["alt"].startswith("toy_0000"))
    redness = first["png"][..., 0].astype(int) - first["png"][..., 2].astype(int)
    row, column = np.unravel_index(np.argmax(ndi.uniform_filter(redness.astype(float), 15)), redness.shape)
    scale = first["width"] / 48
    assert abs(column / scale - 40) < 4 and abs(row / scale - 8) < 4
