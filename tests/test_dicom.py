"""DICOM series in: discovery and grouping by SeriesInstanceUID, the output names, the header checks of a series,
the reader, and the round trip through the bundle's inference CLI, whose maps must lie on each series' own grid
(computed here from the DICOM attributes, independently of MONAI's reader) and equal the maps of the same volume
given as NIfTI."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from conftest import textured_scan, write_models
from scripts.io import dicom as dicomio
from scripts.io.cases import check_scan as _check_scan
from scripts.io.cases import list_inputs
from scripts.io.files import bundle_configs

# MONAI's LoadImage makes its nvImageCodec DICOM reader, which warns that nvImageCodec is missing (the bundle
# silences it at import; pytest resets warning filters per test)
pytestmark = pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader:UserWarning")
ROOT = Path(__file__).resolve().parents[1]
TINY = {"network_depth": 3, "network_base_filters": 4, "spatial_size": [24, 24, 24]}
ROWS, COLUMNS, SLICES = 16, 20, 12
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def rotation(x_degrees: float, z_degrees: float) -> np.ndarray:
    a, b = np.radians(x_degrees), np.radians(z_degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rz @ rx


# (row direction, column direction) of ImageOrientationPatient, LPS: an oblique axial CT and a sagittal MR
CT_ORIENTATION = rotation(20, 30)[:, :2].T
MR_ORIENTATION = (rotation(8, 0) @ np.array([[0.0, 0.0], [1.0, 0.0], [0.0, -1.0]])).T


def volume(seed: int = 0) -> np.ndarray:
    """A textured test volume on the reader's grid: (columns, rows, slices)."""
    return textured_scan((COLUMNS, ROWS, SLICES), seed)[0][0].numpy()


def write_series(folder: Path, modality: str = "CT", number: int | None = 3, description: str | None = "oblique",
                 orientation: np.ndarray = CT_ORIENTATION, spacing=(0.8, 1.1), step: float = 2.5,
                 origin=(-12.0, 30.0, 41.0), uid: str | None = None, prefix: str = "im", seed: int = 0,
                 slices: int = SLICES, rows: int = ROWS, columns: int = COLUMNS, values: np.ndarray | None = None,
                 edit=None) -> tuple[str, list[Path]]:
    """A DICOM series of ``slices`` single-frame images (rows x columns) in ``folder``: CT (int16, rescaled to HU)
    or MR (uint16). The file names run against InstanceNumber (im011 is instance 1), so nothing depends on their
    order. ``values`` (columns, rows, slices) are the intensities (rescaled, for CT); ``edit(k, dataset)`` may change
    a slice before it is written. Returns (SeriesInstanceUID, the files)."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    values = volume(seed) if values is None else values
    x, y = (np.asarray(v, dtype=np.float64) / np.linalg.norm(v) for v in orientation)
    normal = np.cross(x, y)
    sop = CTImageStorage if modality == "CT" else MRImageStorage
    files = []
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.826.0.1.3680043.8.498.1", uid, modality
        if number is not None:
            ds.SeriesNumber = number
        if description is not None:
            ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*x, *y)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in np.asarray(origin) + k * step * normal]
        ds.PixelSpacing, ds.SliceThickness = [f"{spacing[0]:g}", f"{spacing[1]:g}"], f"{abs(step):g}"
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        plane = values[:columns, :rows, k % values.shape[2]].T  # (rows, columns)
        if modality == "CT":
            ds.PixelRepresentation, ds.RescaleIntercept, ds.RescaleSlope = 1, -1024, 1
            ds.PixelData = np.round(plane + 1024).astype(np.int16).tobytes()
        else:
            ds.PixelRepresentation = 0
            ds.PixelData = np.clip(np.round(plane), 0, None).astype(np.uint16).tobytes()
        if edit is not None:
            edit(k, ds)
        path = folder / f"{prefix}{slices - 1 - k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return uid, files


def series_geometry(files) -> tuple[tuple[int, int, int], np.ndarray]:
    """The grid of a series from its DICOM attributes (PS3.3 C.7.6.2.1.1): voxel (i, j, k) is column i, row j of
    the k-th slice in InstanceNumber order, its centre at ImagePositionPatient_k + i * PixelSpacing[1] * (row
    direction) + j * PixelSpacing[0] * (column direction), in LPS; returned as (shape, RAS affine)."""
    headers = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in files), key=lambda d: int(d.InstanceNumber))
    first, last = headers[0], headers[-1]
    x, y = np.asarray(first.ImageOrientationPatient[:3], float), np.asarray(first.ImageOrientationPatient[3:], float)
    row_spacing, column_spacing = map(float, first.PixelSpacing)
    start = np.asarray(first.ImagePositionPatient, float)
    step = (np.asarray(last.ImagePositionPatient, float) - start) / (len(headers) - 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = x * column_spacing, y * row_spacing, step, start
    for k, header in enumerate(headers):  # every slice where the affine puts it
        assert np.allclose(lps @ [0, 0, k, 1], [*map(float, header.ImagePositionPatient), 1], atol=1e-3)
    # and a second opinion on the in-plane axes, nibabel's DICOM wrapper (its voxel axes: row, column)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "highly experimental": its single-slice affine is enough here
        from nibabel.nicom.dicomwrappers import wrapper_from_file

        first_file = next(f for f in files if int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) == 1)
        nibabel_lps = wrapper_from_file(str(first_file)).affine
    assert np.allclose(nibabel_lps[:3, [1, 0, 3]], lps[:3, [0, 1, 3]], atol=1e-4)
    return (int(first.Columns), int(first.Rows), len(headers)), LPS_TO_RAS @ lps


@pytest.fixture(scope="module")
def nifti(normal_scans):
    return sorted(normal_scans["brain"].glob("*.nii.gz"))[0]


def linked_files(item: dict) -> list[Path]:
    return sorted(p.resolve() for p in Path(item["image_path"]).iterdir())


def test_one_series_per_subfolder_after_the_nifti_files(tmp_path, nifti):
    (tmp_path / "top.nii.gz").write_bytes(nifti.read_bytes())
    _, ct = write_series(tmp_path / "patient 1" / "ct", "CT", description="Abdomen/Pelvis 2.5mm")
    mr_uid, mr = write_series(tmp_path / "patient 1" / "mr", "MR", number=7, description=None,
                              orientation=MR_ORIENTATION, spacing=(1.2, 0.9), step=-3.0)
    items = list_inputs(tmp_path)
    assert [i["name"] for i in items] == ["top.nii.gz", "patient_1_ct_S3_Abdomen_Pelvis_2.5mm.nii.gz",
                                          "patient_1_mr_S7.nii.gz"]
    assert [i["source"] for i in items] == ["top.nii.gz", "patient 1/ct", "patient 1/mr"]
    assert items[0]["series_uid"] == "" and items[0]["image_path"] == str(tmp_path / "top.nii.gz")
    assert items[2]["series_uid"] == mr_uid
    assert linked_files(items[1]) == sorted(p.resolve() for p in ct)
    assert linked_files(items[2]) == sorted(p.resolve() for p in mr)
    # MONAI's reader, through the config's: the series' own grid, in RAS
    from monai.transforms import LoadImage

    load = LoadImage(reader=dicomio.NiftiOrDicomReader(), image_only=True, ensure_channel_first=True)
    for item, files, modality in ((items[1], ct, "CT"), (items[2], mr, "MR")):
        shape, affine = series_geometry(files)
        _check_scan(item["image_path"])
        image = load(item["image_path"])
        assert tuple(image.shape) == (1, *shape) == (1, COLUMNS, ROWS, SLICES)
        np.testing.assert_allclose(np.asarray(image.affine), affine, atol=1e-4)
        expected = np.clip(np.round(volume()), 0, None) if modality == "MR" else np.round(volume() + 1024) - 1024
        np.testing.assert_allclose(image[0].numpy(), expected, atol=1e-4)
    assert np.allclose(np.asarray(load(str(tmp_path / "top.nii.gz")).affine), nib.load(nifti).affine)


def test_a_tilted_gantry_series_keeps_its_shear(tmp_path):
    """Slices evenly spaced along a direction that is not their normal (a CT gantry tilt): accepted, and the affine
    holds the shear (its third column is the step between the slice positions)."""
    from monai.transforms import LoadImage

    def tilt(k, ds):
        position = np.asarray(ds.ImagePositionPatient, float) + [0.0, 0.6 * k, 0.0]  # along the columns
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]

    _, files = write_series(tmp_path / "tilted", orientation=np.eye(3)[:2], edit=tilt)
    (item,) = list_inputs(tmp_path)
    assert dicomio.check_series(item["image_path"], 2**28) == (COLUMNS, ROWS, SLICES)
    shape, affine = series_geometry(files)
    np.testing.assert_allclose(affine[:3, 2], [0.0, -0.6, 2.5], atol=1e-4)  # RAS: y negated
    image = LoadImage(reader=dicomio.NiftiOrDicomReader(), image_only=True, ensure_channel_first=True)(
        item["image_path"])
    np.testing.assert_allclose(np.asarray(image.affine), affine, atol=1e-4)


def test_mixed_files_are_grouped_by_series_uid(tmp_path, caplog):
    """Two series in one folder, their files interleaved; one series split over two folders and the input folder
    itself; two series of the same number and no description (their names made unique by the UID)."""
    first, _ = write_series(tmp_path / "mixed", prefix="a", number=2, description=None)
    second, _ = write_series(tmp_path / "mixed", "MR", prefix="b", number=2, description=None, slices=10)
    split = generate_uid()
    write_series(tmp_path / "split" / "part1", uid=split, number=None, description=None, slices=6)
    _, tail = write_series(tmp_path / "split" / "part2", uid=split, number=None, description=None, slices=12)
    for path in tail[:6]:  # instances 7-12 elsewhere; 1-6 come from part1
        path.unlink()
    loose, _ = write_series(tmp_path, number=5, description="loose", slices=4)
    (tmp_path / "z_links").mkdir()  # the same image again, through a link (after the original): read once
    (tmp_path / "z_links" / "again.dcm").symlink_to(tail[7])
    caplog.set_level(logging.INFO)
    items = list_inputs(tmp_path)
    by_uid = {item["series_uid"]: item for item in items}
    assert set(by_uid) == {first, second, split, loose}
    assert by_uid[first]["source"] == by_uid[second]["source"] == "mixed"
    assert by_uid[split]["source"] == "split" and by_uid[loose]["source"] == "."
    assert by_uid[loose]["name"] == "S5_loose.nii.gz"
    plain, renamed = sorted([first, second])  # the same number: ordered by UID, the second made unique
    assert by_uid[plain]["name"] == "mixed_S2.nii.gz"
    assert by_uid[renamed]["name"] == f"mixed_S2_{renamed.replace('.', '')[-8:]}.nii.gz"
    assert by_uid[split]["name"] == f"split_{split}.nii.gz"
    assert [len(linked_files(by_uid[u])) for u in (first, second, split, loose)] == [12, 10, 12, 4]
    names = [item["name"] for item in items]
    assert len(set(names)) == len(names)
    # the split series' slices interleave two folders' files: still one evenly spaced volume
    assert dicomio.check_series(by_uid[split]["image_path"], 2**28) == (COLUMNS, ROWS, 12)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"DICOM series {split}: 1 file holds the same image (SOPInstanceUID) as another file; "
                        "read once"]  # nothing else was skipped


def test_names_are_safe_unique_and_never_a_nifti_inputs():
    series = [dicomio.DicomSeries("1.2.3.45", source="a/b c", number="1", description="T1 *MPRAGE* ä"),
              dicomio.DicomSeries("1.2.3.46", source=".", number="", description="...hidden"),
              dicomio.DicomSeries("1.2.3.47", source="x" * 300, number="2"),
              dicomio.DicomSeries("1.2.3.48", source=".", number="9"),
              dicomio.DicomSeries("1.2.3.49", source=".", number="9")]
    names = dicomio.series_names(series, taken=["s9.nii.gz"])
    assert names[:2] == ["a_b_c_S1_T1_MPRAGE.nii.gz", "hidden.nii.gz"]
    assert len(names[2]) == 120 + len(".nii.gz") and names[2].endswith("x.nii.gz")
    assert names[3:] == ["S9_12348.nii.gz", "S9_12349.nii.gz"]  # "s9.nii.gz" is a NIfTI input's (any case)
    assert all(n.endswith(".nii.gz") and "/" not in n and not n.startswith(".") for n in names)


def test_folders_without_images_are_named_in_the_log(tmp_path, caplog, nifti):
    write_series(tmp_path / "study" / "ct")
    (tmp_path / "study" / "ct" / "notes.txt").write_text("not a scan")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a scan")
    (tmp_path / "junk" / "scan.dcm").write_bytes(b"\0" * 200)  # named like DICOM, but no DICM marker
    (tmp_path / "deeper" / "empty").mkdir(parents=True)
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "scan.nii.gz").write_bytes(nifti.read_bytes())
    (tmp_path / "nested" / "loop").symlink_to(tmp_path)  # a link loop is walked once
    (tmp_path / "readme.txt").write_text("top-level junk keeps its warning")
    caplog.set_level(logging.INFO)
    items = list_inputs(tmp_path)
    assert [i["source"] for i in items] == ["study/ct"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "skipping 'readme.txt': not a NIfTI file (*.nii.gz, *.nii)" in warnings
    assert ("skipping folder 'junk': no DICOM image files, only 2 files that are not DICOM ('notes.txt', "
            "'scan.dcm')") in warnings
    assert "skipping folder 'deeper/empty': no DICOM image files (the folder is empty)" in warnings
    assert any(w.startswith("skipping folder 'nested': no DICOM image files, only 1 NIfTI file ('scan.nii.gz'; "
                            "only the input folder's own NIfTI files are scored") for w in warnings), warnings
    assert "folder 'study/ct': skipping 1 file that is not DICOM ('notes.txt')" in warnings
    assert len(warnings) == 5, warnings  # one each; "deeper" holds only a folder and is not named itself


def test_a_folder_without_any_scan_is_an_error(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"holds no \*\.nii\.gz or \*\.nii scans and no DICOM series"):
        list_inputs(tmp_path)


def _structured_report(folder: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.BasicTextSRStorage
    meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = generate_uid(), ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID = meta, meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber = generate_uid(), "SR", 99
    folder.mkdir(parents=True)
    ds.save_as(folder / "report.dcm", enforce_file_format=True)


def _drop(keyword: str, slice_index: int = 4):
    def edit(k, ds):
        if k == slice_index:
            delattr(ds, keyword)
    return edit


def _truncate(files):
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) - 100])


def _compressed(syntax, data: bytes):
    """An edit that stores every slice's pixel data as ``data``, encapsulated in transfer syntax ``syntax``."""
    from pydicom.encaps import encapsulate

    def edit(k, ds):
        ds.file_meta.TransferSyntaxUID = syntax
        if syntax == pydicom.uid.JPEGBaseline8Bit:
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = encapsulate([data])
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    return edit


def _write_broken(kind: str, folder: Path) -> None:
    edits = {
        "no pixel data": _drop("PixelData"),
        "different sizes": lambda k, ds: (setattr(ds, "Rows", 8), setattr(ds, "PixelData", ds.PixelData[:320]))
        if k == 3 else None,
        "duplicate instance": lambda k, ds: setattr(ds, "InstanceNumber", 1) if k == 5 else None,
        "no instance number": _drop("InstanceNumber"),
        "uneven": lambda k, ds: setattr(ds, "ImagePositionPatient", [f"{float(v) + 4:.4f}" for v in
                                                                     ds.ImagePositionPatient]) if k > 6 else None,
        "no position": _drop("ImagePositionPatient"),
        "multi-frame": lambda k, ds: setattr(ds, "NumberOfFrames", 2) if k == 0 else None,
        "colour": lambda k, ds: setattr(ds, "SamplesPerPixel", 3) if k == 0 else None,
        "undecodable": _compressed(pydicom.uid.JPEGLosslessSV1, b"\xff\xd8\xff\xd9"),
    }
    if kind == "single image":
        write_series(folder, slices=1)
    elif kind == "report":
        _structured_report(folder)
    elif kind == "truncated":
        _truncate(write_series(folder)[1])
    else:
        write_series(folder, edit=edits.get(kind))


BROKEN = {
    "single image": "a single 2D image ('im000.dcm'), not a 3D series",
    "report": "not an image: 'report.dcm' (SOP class Basic Text SR Storage) has no pixel data",
    "no pixel data": "no pixel data: 'im007.dcm' (SOP class CT Image Storage) has no pixel data",
    "different sizes": "slices of different sizes: 'im011.dcm' is 16x20 (rows x columns), 'im008.dcm' 8x20",
    "duplicate instance": "several slices have InstanceNumber 1 (several echoes, phases or stacks in one series?)",
    "no instance number": "'im007.dcm' has no InstanceNumber",
    "uneven": "slice positions are not evenly spaced in InstanceNumber order (steps of 2.5 to 8.4 mm)",
    "no position": "'im007.dcm' has no ImagePositionPatient",
    "multi-frame": "'im011.dcm' is a multi-frame image (2 frames): not read",
    "colour": "'im011.dcm' has 3 samples per pixel (a colour image)",
    "truncated": "'im011.dcm' is truncated: its pixel data holds 540 bytes, its header claims 640",
    "too large": "the headers claim 20x16x12 = 3840 voxels, more than max_scan_voxels (3000)",
    "undecodable": "'im000.dcm': its pixel data is compressed as JPEG Lossless, Non-Hierarchical, First-Order "
                   "Prediction (Process 14 [Selection Value 1]), which none of pydicom's installed decoders reads",
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_broken_series_fails_with_its_reason_from_the_headers(kind, tmp_path):
    _write_broken(kind, tmp_path / "series")
    (item,) = list_inputs(tmp_path)
    with pytest.raises(ValueError) as caught:
        _check_scan(item["image_path"], 3000 if kind == "too large" else 2**28)
    assert str(caught.value).startswith(BROKEN[kind]), str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_readers_own_error_is_the_reason(tmp_path):
    """A series that passes the header checks but cannot be decoded: pydicom's error, not LoadImage's "cannot find
    a suitable reader" after trying every other reader."""
    from monai.transforms import LoadImaged

    from scripts.cli import describe_error

    write_series(tmp_path / "series", edit=_compressed(pydicom.uid.JPEGBaseline8Bit, b"\xff\xd8garbage\xff\xd9"))
    (item,) = list_inputs(tmp_path)
    _check_scan(item["image_path"])
    with pytest.raises(Exception) as caught:
        LoadImaged("image", reader=dicomio.NiftiOrDicomReader())(item)
    assert "Unable to decode" in describe_error(caught.value) and "suitable reader" not in str(caught.value)


@pytest.mark.parametrize("sheared", [False, True], ids=["orthogonal", "gantry_tilt"])
def test_the_map_of_a_series_is_written_on_the_grid_it_carries(sheared, tmp_path):
    """``WritePixelMapd`` on a DICOM item: shape and affine from the map itself; both NIfTI codes "scanner", but a
    sheared grid (a tilted gantry's) only in the sform, since the qform cannot hold a shear."""
    import torch
    from monai.data import MetaTensor

    from scripts.inference.writers import WritePixelMapd

    affine = np.diag([-0.8, -1.1, 2.5, 1.0])
    affine[:3, 3] = [12.0, -30.0, 41.0]
    if sheared:
        affine[1, 2] = 0.7
    pred = MetaTensor(torch.rand(1, 4, 5, 6), affine=torch.as_tensor(affine))
    item = {"name": "s.nii.gz", "image_path": str(tmp_path), "series_uid": "1.2.3", "error": "", "pred": pred}
    WritePixelMapd(output_dir=tmp_path / "out", dtype="float32")(item)
    written = nib.load(tmp_path / "out" / "s.nii.gz")
    assert written.shape == (4, 5, 6)
    np.testing.assert_allclose(written.affine, affine, atol=1e-6)
    assert written.header["sform_code"] == 1 and written.header["qform_code"] == (0 if sheared else 1)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), pred[0].numpy())


def infer(input_dir: Path, output_dir: Path, models: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bundle"))
    command = [sys.executable, "-m", "monai.bundle", "run", "--meta_file", "bundle/configs/metadata.json",
               "--bundle_root", "bundle", "--config_file", repr(bundle_configs("bundle", "inference", "brain")),
               "--dataset_dir", str(input_dir), "--output_dir", str(output_dir), "--mode", "both",
               "--models_dir", str(models), *extra]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_round_trip_through_the_bundle_cli(tmp_path, nifti):
    """``--mode both`` on a folder of a NIfTI scan, an oblique CT and a sagittal MR series, the CT's volume also as
    a NIfTI on the grid computed from its headers, a broken series and a junk folder: every map lies on its
    series' grid, the CT's equals its NIfTI twin's, the broken series fails with its reason and gets the fallback
    score, the others are scored."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    (inputs / "scan.nii.gz").parent.mkdir()
    (inputs / "scan.nii.gz").write_bytes(nifti.read_bytes())
    _, ct = write_series(inputs / "p1" / "ct", "CT")
    _, mr = write_series(inputs / "p1" / "mr", "MR", number=4, description="sag T2", orientation=MR_ORIENTATION,
                         spacing=(1.2, 0.9), step=-3.0, seed=1)
    _write_broken("different sizes", inputs / "p2" / "broken")
    (inputs / "p2" / "junk").mkdir()
    (inputs / "p2" / "junk" / "notes.txt").write_text("x")
    ct_shape, ct_affine = series_geometry(ct)
    hu = (np.round(volume() + 1024) - 1024).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, ct_affine), inputs / "ct_twin.nii.gz")
    models = write_models(tmp_path / "models", "brain", [0], **TINY)
    result = infer(inputs, out, models, "--pixel_map_dtype", "float32")
    log = result.stdout + result.stderr
    assert result.returncode == 3, log[-4000:]  # the broken series failed; every other case was scored
    ct_name, mr_name, broken = "p1_ct_S3_oblique.nii.gz", "p1_mr_S4_sag_T2.nii.gz", "p2_broken_S3_oblique.nii.gz"
    maps = sorted(p.name for p in out.glob("*.nii.gz"))
    assert maps == sorted(["scan.nii.gz", "ct_twin.nii.gz", ct_name, mr_name])
    scores = {p.name[:-4]: float(p.read_text()) for p in out.glob("*.txt")}
    assert set(scores) == {*maps, broken} and scores[broken] == 1.0  # the documented fallback
    assert all(0 <= s < 1 for name, s in scores.items() if name != broken)
    assert f"{broken}: FAILED: slices of different sizes" in result.stdout
    assert "skipping folder 'p2/junk': no DICOM image files" in log
    assert "summary: 4 done, 1 failed" in result.stdout
    for name, files in ((ct_name, ct), (mr_name, mr)):
        shape, affine = series_geometry(files)
        written = nib.load(out / name)
        assert written.shape == shape == (COLUMNS, ROWS, SLICES)
        np.testing.assert_allclose(written.affine, affine, atol=1e-4)
        assert written.header["sform_code"] == written.header["qform_code"] == 1  # scanner (patient) coordinates
        np.testing.assert_allclose(written.header.get_qform(), affine, atol=1e-4)
        values = np.asanyarray(written.dataobj)
        assert values.min() >= 0 and values.max() <= 1 and values.std() > 0
    # the series and its NIfTI twin: the same voxels on the same grid, so the same map
    np.testing.assert_allclose(np.asanyarray(nib.load(out / ct_name).dataobj),
                               np.asanyarray(nib.load(out / "ct_twin.nii.gz").dataobj), atol=1e-6)
    assert ct_shape == nib.load(out / "ct_twin.nii.gz").shape
    assert scores[ct_name] == scores["ct_twin.nii.gz"]
