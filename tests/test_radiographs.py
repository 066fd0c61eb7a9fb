"""Native 2D images (chest radiographs, xray.yaml): PNG, JPEG and DICOM inputs through MONAI's readers, the paper's
preprocessing (DICOM window, histogram equalisation onto [-1, 1]), discovery and header checks, and 2D training and
inference through the bundle CLI: the NIfTI map on the image's own grid, the PNG overlay, the score."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage as ndi

from scripts.io.files import bundle_configs
from scripts.io.radiographs import (
    RadiographReader,
    check_radiograph,
    list_radiograph_inputs,
    list_radiographs,
    output_name,
    read_for_display,
)
from scripts.transforms import RadiographIntensity

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--spatial_size", "[32,32]", "--network_depth", "3", "--network_base_filters", "4", "--num_workers", "0",
        "--max_val_samples", "6", "--batch_size", "4"]


def picture(seed: int, rows: int = 48, columns: int = 40) -> np.ndarray:
    """A smooth radiograph-like picture in [0, 1], row-major (rows, columns), with dark air at the left edge."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:rows, :columns] / max(rows, columns)
    image = 0.3 + 0.4 * np.exp(-((x - 0.5) ** 2 + (y - 0.6) ** 2) * 4)
    image = image + 0.1 * ndi.gaussian_filter(rng.standard_normal((rows, columns)), 2)
    image[:, :3] = 0
    return np.clip(image, 0, 1)


def write_png(path: Path, image: np.ndarray) -> Path:
    Image.fromarray((image * 65535).round().astype(np.uint16)).save(path)
    return path


def write_dicom(path: Path, stored: np.ndarray, window=None, photometric="MONOCHROME2", spacing=(0.7, 0.7),
                spacing_tag="PixelSpacing") -> Path:
    """A single-image DX DICOM of the 12-bit values ``stored`` (rows, columns), ``spacing`` (between rows, between
    columns) in ``spacing_tag`` (None: no spacing)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "DX", photometric, 1
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if spacing_tag is not None:
        setattr(ds, spacing_tag, [float(v) for v in spacing])
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_equalisation_onto_minus_one_one_ignores_any_monotone_intensity_mapping():
    image = torch.from_numpy(picture(0)[None].copy()).float()  # (1, rows, columns): any 2D grid will do
    out = RadiographIntensity()(image)
    assert out.shape == image.shape and out.dtype == torch.float32
    assert float(out.min()) >= -1 and float(out.max()) == pytest.approx(1.0)
    # equalised values are the fraction of pixels below: about uniform over [-1, 1]
    interior = out[image > 0]
    assert float(interior.mean()) == pytest.approx(0.0, abs=0.15)
    gamma = RadiographIntensity()(image**2.2 * 4000 + 7)  # a gamma and a detector's scale
    assert float((gamma - out).abs().mean()) < 0.01
    # order is kept: brighter pixels never get a lower value
    order = torch.argsort(image.flatten())
    assert bool((out.flatten()[order].diff() >= -1e-6).all())


def test_dicom_window_and_monochrome1_come_from_the_header():
    values = torch.linspace(0, 4000, 1000).reshape(1, 20, 50)
    window = {"00281050": {"vr": "DS", "Value": [2000]}, "00281051": {"vr": "DS", "Value": [1000]}}
    windowed = MetaTensor(values, meta=window)
    out = RadiographIntensity()(windowed)
    below, inside, above = out[values < 1500], out[(values > 1520) & (values < 2480)], out[values > 2500]
    assert torch.all(below == below[0]) and torch.all(above == above[0])  # clipped to the window
    assert float(below[0]) < float(inside.min()) and float(inside.max()) < float(above[0])
    inverted = MetaTensor(values, meta={"00280004": {"vr": "CS", "Value": ["MONOCHROME1"]}})
    plain = RadiographIntensity()(values)
    torch.testing.assert_close(RadiographIntensity()(inverted).flatten(), plain.flatten().flip(0), atol=2e-3, rtol=0)


def test_png_jpeg_and_dicom_read_to_the_same_grid_and_image(tmp_path):
    image = picture(1)
    stored = (image * 4095).round()
    png = write_png(tmp_path / "a.png", stored / 4095)
    dicom = write_dicom(tmp_path / "a.dcm", stored)
    Image.fromarray((image * 255).round().astype(np.uint8)).convert("RGB").save(tmp_path / "a.jpg", quality=95)
    load = LoadImage(reader=RadiographReader(), image_only=True, ensure_channel_first=True)
    from_png, from_dicom, from_jpeg = load(str(png)), load(str(dicom)), load(str(tmp_path / "a.jpg"))
    assert tuple(from_png.shape) == tuple(from_dicom.shape) == (1, 40, 48)  # (columns, rows): the transpose
    assert from_jpeg.shape == (3, 40, 48)
    np.testing.assert_allclose(np.asarray(from_png[0]), (stored / 4095 * 65535).round().T, atol=0.5)
    np.testing.assert_allclose(np.asarray(from_dicom[0]), stored.T)
    assert "00281050" not in from_dicom.meta  # no window in this file
    # the same picture gives the same preprocessed image, whatever the file format
    torch.testing.assert_close(RadiographIntensity()(from_png), RadiographIntensity()(from_dicom), atol=5e-3, rtol=0)
    assert float((RadiographIntensity()(from_jpeg) - RadiographIntensity()(from_png)).abs().mean()) < 0.02
    windowed = load(str(write_dicom(tmp_path / "w.dcm", stored, window=(2000, 800))))
    assert float(windowed.meta["00281050"]["Value"][0]) == 2000  # the header's window reaches the preprocessing


@pytest.mark.parametrize("tag", ["PixelSpacing", "ImagerPixelSpacing", None])
def test_a_dicom_radiograph_keeps_its_pixel_spacing_on_the_column_and_row_axes(tmp_path, tag):
    """MONAI's reader gives a radiograph without ImagePositionPatient unit pixels; RadiographReader takes PixelSpacing
    (else ImagerPixelSpacing), (between rows, between columns), onto the (columns, rows) axes."""
    stored = (picture(3, rows=36, columns=52) * 4095).round()
    load = LoadImage(reader=RadiographReader(), image_only=True, ensure_channel_first=True)
    image = load(str(write_dicom(tmp_path / "a.dcm", stored, spacing=(0.5, 0.8), spacing_tag=tag)))
    assert tuple(image.shape) == (1, 52, 36)
    expected = (0.8, 0.5) if tag else (1.0, 1.0)  # column spacing first: the first axis runs along a row
    np.testing.assert_allclose(np.asarray(image.pixdim), expected)
    # the image's own grid, as a PNG's: world x along a row, y down the columns (MONAI's reader swaps them)
    np.testing.assert_allclose(np.asarray(image.affine), np.diag([*expected, 1.0, 1.0]))
    png = load(str(write_png(tmp_path / "a.png", picture(3))))
    np.testing.assert_allclose(np.asarray(png.affine), np.eye(4))


def test_discovery_names_checks_and_clear_errors(tmp_path):
    write_png(tmp_path / "a.png", picture(0))
    write_dicom(tmp_path / "a.dcm", (picture(1) * 4095).round())
    write_dicom(tmp_path / "no_suffix", (picture(2) * 4095).round())  # DICOM by content
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    items = list_radiograph_inputs(tmp_path)
    # in file-name order: a.dcm takes the stem's name, a.png its suffix
    assert [i["name"] for i in items] == ["a.nii.gz", "a_png.nii.gz", "broken.nii.gz", "no_suffix.nii.gz"]
    assert items[0]["series_uid"] and items[1]["series_uid"] == "" and items[1]["source"] == "a.png"
    assert items[3]["series_uid"]
    assert output_name("x.png", {"x.nii.gz", "x_png.nii.gz"}) == "x_2.nii.gz"
    with pytest.raises(ValueError, match="not a readable PNG or JPEG"):
        check_radiograph(tmp_path / "broken.png", 10**6)
    with pytest.raises(ValueError, match="more than max_scan_voxels"):
        check_radiograph(tmp_path / "a.png", 100)
    with pytest.raises(ValueError, match="broken.png"):
        list_radiographs(tmp_path)
    (tmp_path / "broken.png").unlink()
    assert len(list_radiographs(tmp_path)) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no PNG, JPEG or DICOM"):
        list_radiograph_inputs(empty)


def bundle(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bundle"))
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode in (0, 3), result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_2d_training_and_inference_through_the_cli(tmp_path):
    """Every fold of a 2D model on ten PNG radiographs (xray.yaml), then inference on PNG, JPEG and DICOM inputs and
    a broken file: a 2D NIfTI map on each image's own grid (a DICOM's with its pixel size), the PNG overlay over the
    image at its own size, the score, the worklist row; the broken file fails alone."""
    train = tmp_path / "train"
    train.mkdir()
    for seed in range(10):
        write_png(train / f"x_{seed:02d}.png", picture(seed))
    run = tmp_path / "run"
    configs = [str(ROOT / "bundle/configs" / n) for n in ("common.yaml", "train.yaml", "xray.yaml")]
    bundle("-m", "scripts.training", "--config_file", *configs, "--output_dir", str(run), "--dataset_dir", str(train),
           "--cache_dir", str(tmp_path / "cache"), "--max_epochs", "1", *TINY)
    plan = json.loads((run / "models/xray/plans.json").read_text())
    assert plan["spatial_size"] == [32, 32] and plan["network"]["args"]["spatial_dims"] == 2
    assert plan["normalisation"]["mode"] == "none" and plan["slice_axis"] is None
    assert plan["operating_points"]["sample"]["thresholds"]

    inputs = tmp_path / "in"
    inputs.mkdir()
    write_png(inputs / "case.png", picture(20, rows=60, columns=44))
    write_dicom(inputs / "case.dcm", (picture(21, rows=36, columns=52) * 4095).round(), window=(1800, 2400),
                spacing=(0.5, 0.8))
    Image.fromarray((picture(22) * 255).astype(np.uint8)).convert("RGB").save(inputs / "colour.jpg")
    (inputs / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    result = bundle("-m", "monai.bundle", "run", "--meta_file", "bundle/configs/metadata.json", "--bundle_root",
                    "bundle", "--config_file", repr(bundle_configs("bundle", "inference", "xray")),
                    "--dataset_dir", str(inputs), "--output_dir", str(out), "--mode", "both",
                    "--models_dir", str(run / "models"))
    assert result.returncode == 3 and "summary: 3 done, 1 failed" in result.stdout + result.stderr
    for name, source, shape in (("case", "case.dcm", (52, 36)), ("case_png", "case.png", (44, 60)),
                                ("colour", "colour.jpg", (40, 48))):  # case.dcm sorts first: it takes "case"
        written = nib.load(out / f"{name}.nii.gz")
        assert written.shape == shape  # the image's own grid, (columns, rows), with its pixel size
        assert written.header.get_zooms()[:2] == ((0.8, 0.5) if name == "case" else (1.0, 1.0))
        values = np.asarray(written.dataobj)
        assert 0 <= values.min() and values.max() <= 1
        # the overlay: the image itself at its own size (width = columns), the map's heat where it is high
        overlay = Image.open(out / f"{name}_overlay.png")
        assert overlay.mode == "RGB" and overlay.size == shape
        grey = np.round((np.clip(read_for_display(inputs / source)[0], -1, 1) + 1) * 127.5).T  # row-major
        rgb = np.asarray(overlay).astype(np.float64)
        faint = values.T < 0.01
        assert faint.any() and np.abs(rgb[faint] - grey[faint][:, None]).max() <= 4
        assert 0 <= float((out / f"{name}.nii.gz.txt").read_text()) <= 1
    assert float((out / "broken.nii.gz.txt").read_text()) == 1.0 and not (out / "broken.nii.gz").exists()
    with open(out / "scores.csv", newline="") as f:
        rows = {row["name"]: row for row in csv.DictReader(f)}
    assert rows["broken.nii.gz"]["status"] == "failed" and "not a readable PNG" in rows["broken.nii.gz"]["reason"]
    assert rows["case.nii.gz"]["source"] == "case.dcm" and rows["case.nii.gz"]["series_uid"]
    assert all(rows[n]["status"] == "ok" for n in ("case.nii.gz", "case_png.nii.gz", "colour.nii.gz"))


def test_the_overlay_is_drawn_over_the_source_image_and_never_left_stale(tmp_path, caplog):
    """WriteOverlayd with ``source_key``: the input file's own pixels under the map, upright (an all-zero map leaves
    exactly the displayed image; a bright top-left quadrant stays top left), the heat where the map is high, and a
    map on another grid or an input gone since it was read gets no overlay (an earlier run's is removed) while the
    case goes on."""
    from scripts.inference.writers import WriteOverlayd

    rows, columns = 30, 20
    values = np.full((rows, columns), 0.2)
    values[:10, :8] = 0.9  # the top-left corner of the picture, bright
    source = write_png(tmp_path / "a.png", values)
    writer = WriteOverlayd(keys="pred", source_key="image_path", output_dir=tmp_path / "out")
    target = tmp_path / "out" / "a_overlay.png"
    item = {"name": "a.nii.gz", "image_path": str(source), "pred": torch.zeros(1, columns, rows)}
    writer(item)
    overlay = np.asarray(Image.open(target))
    assert overlay.shape == (rows, columns, 3) and (overlay[..., 0] == overlay[..., 2]).all()  # grey
    assert overlay[:10, :8].min() > overlay[10:, :].max() and overlay[:10, :8].min() > overlay[:, 8:].max()
    grey = np.round((np.clip(read_for_display(source)[0], -1, 1) + 1) * 127.5).T
    assert np.array_equal(overlay, np.repeat(grey[..., None], 3, axis=-1))
    hot = torch.zeros(1, columns, rows)
    hot[0, 15:, 25:] = 1.0  # the map's (column, row): the bottom-right corner of the picture
    writer({**item, "pred": hot})
    overlay = np.asarray(Image.open(target)).astype(int)
    assert (overlay[25:, 15:] == 255).all() and (overlay[:25, :15, 0] == overlay[:25, :15, 2]).all()

    for broken in ({**item, "pred": torch.zeros(1, 32, 32)}, {**item, "image_path": str(tmp_path / "gone.png")}):
        writer(item)
        with caplog.at_level(logging.WARNING, logger="scripts.inference.writers"):
            out = writer(broken)
        assert out["pred"] is broken["pred"] and not target.exists() and "a: no overlay" in caplog.text
        caplog.clear()
