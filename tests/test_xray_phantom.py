"""The chest radiograph phantom (tools/xray_phantom.py): deterministic subjects, anatomy where it belongs, each
held-out anomaly kind inside its label and nowhere else, and the dataset layout read back as the bundle reads it
(MONAI's PILReader and PydicomReader)."""

from __future__ import annotations

import json
import time
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
from monai.transforms import LoadImage
from PIL import Image
from scipy import ndimage as ndi

from tools.xray_phantom import (
    ANOMALY_KINDS,
    MASK_TOLERANCE,
    _estimate_lungs,
    add_anomaly,
    chest_geometry,
    chest_radiograph,
    main,
    toy_case,
    toy_subject_seed,
    train_subject_seed,
    write_dicom_radiograph,
    write_xray_dataset,
)

SIZE = 64


def _load(path, reader=None) -> np.ndarray:
    with warnings.catch_warnings():
        # a radiograph has no ImagePositionPatient: PydicomReader says its affine is the identity
        warnings.filterwarnings("ignore", message="PydicomReader: ImageOrientationPatient", category=UserWarning)
        return np.asarray(LoadImage(reader=reader, image_only=True)(str(path)))


def test_subjects_are_deterministic_in_seed_and_size_and_differ_between_seeds():
    image, body = chest_radiograph(5, SIZE)
    again, body_again = chest_radiograph(5, SIZE)
    assert np.array_equal(image, again) and np.array_equal(body, body_again)
    assert not np.array_equal(image, chest_radiograph(6, SIZE)[0])
    assert image.shape == body.shape == (SIZE, SIZE) and image.dtype == np.float32 and body.dtype == bool
    assert 0.0 <= image.min() and image.max() <= 1.0 and np.isfinite(image).all()
    assert 0.3 < body.mean() < 0.85  # the patient, with air around
    small, _ = chest_radiograph(5, 48)
    assert small.shape == (48, 48)
    with pytest.raises(ValueError):
        chest_radiograph(5, 16)


def test_a_full_size_radiograph_takes_well_under_a_second():
    chest_radiograph(0, 256)  # warm-up (imports, caches)
    start = time.perf_counter()
    image, _ = chest_radiograph(1, 256)
    assert time.perf_counter() - start < 1.0 and image.shape == (256, 256)


@pytest.mark.parametrize("seed", [0, 3])
def test_anatomy_air_darkest_lungs_darker_than_mediastinum_and_heart_on_the_image_right(seed):
    image, body = chest_radiograph(seed, SIZE)
    geometry = chest_geometry(seed, SIZE)
    assert np.array_equal(geometry["body"], body)
    lungs, heart, mediastinum = geometry["lungs"], geometry["heart"], geometry["mediastinum"]
    assert lungs.sum() > 0.15 * body.sum() and heart.any() and mediastinum.any()
    assert not (lungs & heart).any() and (lungs | heart | mediastinum)[~body].sum() == 0
    air, soft = image[~body].mean(), image[body & ~lungs].mean()
    assert air < 0.1 < image[lungs].mean() and air < soft
    assert image[lungs].mean() + 0.15 < image[mediastinum].mean()
    assert image[lungs].mean() + 0.15 < image[heart].mean()
    # the edges are air; the patient's right lung on the image left; the heart right of the image centre
    assert not body[:, 0].any() and not body[:, -1].any()
    columns = np.arange(SIZE)
    assert columns[geometry["lung_right"].any(axis=0)].mean() < SIZE / 2 < columns[geometry["lung_left"].any(
        axis=0)].mean()
    assert ndi.center_of_mass(heart)[1] > SIZE / 2 and ndi.center_of_mass(heart)[0] > SIZE / 2
    # the lung markings are part of the image: brighter where vessels are, zero outside the lungs
    markings = geometry["markings"]
    assert markings[lungs].max() > 0.05 and np.abs(markings[~ndi.binary_dilation(lungs, iterations=3)]).max() < 1e-3
    # the lungs can be found in the image alone (what add_anomaly does without the geometry)
    for found, true in zip(_estimate_lungs(image, body), (geometry["lung_right"], geometry["lung_left"])):
        assert (found & true).sum() / (found | true).sum() > 0.55


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
@pytest.mark.parametrize("seed", [11, 12])
def test_each_anomaly_changes_the_image_inside_its_mask_and_nowhere_else(kind, seed):
    image, body = chest_radiograph(seed, SIZE)
    geometry = chest_geometry(seed, SIZE)
    anomalous, mask = add_anomaly(image, body, kind, np.random.default_rng(seed), geometry=geometry)
    again, mask_again = add_anomaly(image, body, kind, np.random.default_rng(seed), geometry=geometry)
    assert np.array_equal(anomalous, again) and np.array_equal(mask, mask_again)  # deterministic in rng
    assert anomalous.dtype == np.float32 and anomalous.shape == image.shape and mask.dtype == bool
    assert 0.0 <= anomalous.min() and anomalous.max() <= 1.0
    assert mask.any() and not (mask & ~body).any()
    delta = np.abs(anomalous.astype(np.float64) - image)
    assert (delta > MASK_TOLERANCE)[mask].mean() > 0.8  # the mask is what changed
    assert delta[~mask].max() <= MASK_TOLERANCE + 1e-6  # and nothing outside it changed meaningfully
    assert (delta[~mask] > 0).sum() <= 0.5 * mask.sum()  # (a soft edge's faint tail at most)
    lungs = geometry["lungs"]
    radius = np.sqrt(mask.sum() / np.pi) / SIZE
    if kind in ("nodule", "mass", "pneumothorax", "effusion"):
        assert (mask & lungs).sum() >= 0.95 * mask.sum()
    if kind == "nodule":
        assert 0.012 < radius < 0.05 and anomalous[mask].mean() > image[mask].mean() + 0.05
    elif kind == "mass":
        assert 0.04 < radius < 0.14 and anomalous[mask].mean() > image[mask].mean() + 0.1
    elif kind == "effusion":
        assert anomalous[mask].mean() > image[mask].mean() + 0.08
        assert anomalous[mask].std() < image[mask].std()  # homogeneous: no markings, no ribs
        # the base of one lung: the mask reaches the lung's lowest rows on its side
        side = geometry["lung_right"] if (mask & geometry["lung_right"]).sum() > (mask & geometry["lung_left"]).sum() \
            else geometry["lung_left"]
        assert np.nonzero(mask)[0].max() >= np.nonzero(side)[0].max() - 1
    elif kind == "foreign_object":
        assert anomalous[mask].max() > 0.9 and anomalous[mask].mean() > image[mask].mean() + 0.1


@pytest.mark.parametrize("seed", [11, 21])
def test_the_effusion_meniscus_is_concave_upwards(seed):
    image, body = chest_radiograph(seed, 128)
    geometry = chest_geometry(seed, 128)
    _, mask = add_anomaly(image, body, "effusion", np.random.default_rng(seed), geometry=geometry)
    columns = np.nonzero(mask.any(axis=0))[0]
    tops = np.array([np.nonzero(mask[:, c])[0].min() for c in columns])  # the fluid's top row per column
    lateral_is_left = columns.mean() < 64
    lateral, medial = (tops[: len(tops) // 4], tops[-len(tops) // 4:]) if lateral_is_left else \
        (tops[-len(tops) // 4:], tops[: len(tops) // 4])
    assert lateral.mean() < medial.mean() - 2  # higher (smaller rows) along the chest wall


@pytest.mark.parametrize("with_geometry", [True, False])
def test_a_pneumothorax_is_darker_without_vessel_markings_and_has_a_bright_pleural_line(with_geometry):
    seed, size = 4, 128
    image, body = chest_radiograph(seed, size)
    geometry = chest_geometry(seed, size)
    anomalous, mask = add_anomaly(image, body, "pneumothorax", np.random.default_rng(3),
                                  geometry=geometry if with_geometry else None)
    image64, anomalous64 = image.astype(np.float64), anomalous.astype(np.float64)
    air = mask & (anomalous64 < image64 - MASK_TOLERANCE)  # the pleural space
    line = mask & (anomalous64 > image64 + MASK_TOLERANCE)  # the visceral pleural line
    assert air.sum() > 0.5 * mask.sum() and line.any()
    # in the lung (without geometry: in the lung estimated from the image, mostly the true one)
    assert (mask & geometry["lungs"]).sum() >= (0.95 if with_geometry else 0.75) * mask.sum()
    # no vessel markings left: lower local variance inside the region than the same pixels had before
    inner = ndi.binary_erosion(air, structure=np.ones((5, 5)))  # where a 5 x 5 window lies in the pleural space
    assert inner.sum() > 20

    def local_variance(picture):
        mean = ndi.uniform_filter(picture, 5)
        return ndi.uniform_filter(picture**2, 5) - mean**2

    assert local_variance(anomalous64)[inner].mean() < 0.85 * local_variance(image64)[inner].mean()
    assert anomalous64[inner].mean() < image64[inner].mean() - 0.05
    # the vessel markings were there (the image follows them) and are gone (the anomalous image much less so)
    markings = geometry["markings"][inner]
    before, after = (np.corrcoef(picture[inner], markings)[0, 1] for picture in (image64, anomalous64))
    assert markings.max() > 0.03
    if with_geometry:  # (without it, the region follows the estimated lung, and a median filter takes them away)
        assert before > 0.3 and after < before - 0.25
    # the region runs along the lung's lateral wall, in its upper part
    rows, columns = np.nonzero(air)
    lung = geometry["lung_right"] if (air & geometry["lung_right"]).sum() else geometry["lung_left"]
    lung_rows, lung_columns = np.nonzero(lung)
    assert rows.mean() < lung_rows.mean()
    assert abs(columns.mean() - size / 2) > abs(lung_columns.mean() - size / 2)


def test_anomalies_without_geometry_and_bad_inputs():
    image, body = chest_radiograph(8, SIZE)
    for index, kind in enumerate(ANOMALY_KINDS):
        anomalous, mask = add_anomaly(image, body, kind, index)  # an int seed is an rng too
        delta = np.abs(anomalous.astype(np.float64) - image)
        assert mask.any() and not (mask & ~body).any() and delta[~mask].max() <= MASK_TOLERANCE + 1e-6
    with pytest.raises(ValueError, match="kind must be one of"):
        add_anomaly(image, body, "tumour", np.random.default_rng(0))
    with pytest.raises(ValueError):
        add_anomaly(image, body[:-1], "nodule", np.random.default_rng(0))


def test_training_and_toy_subjects_never_meet():
    train = {train_subject_seed(seed, i) for seed in range(3) for i in (0, 1, 49_999)}
    toy = {toy_subject_seed(seed, i) for seed in range(3) for i in (0, 1, 49_999)}
    assert not train & toy and len(train) == len(toy) == 9
    with pytest.raises(ValueError):
        train_subject_seed(0, 50_000)


def test_the_dataset_layout_labels_and_orientation_read_back_as_the_bundle_reads_them(tmp_path):
    seed, size = 2, 48
    written = write_xray_dataset(tmp_path, n_train=2, n_toy=10, seed=seed, size=size, dicom=True)
    root = tmp_path / "xray"
    assert written["root"] == str(root) and written["n_anomalous"] == 5
    assert sorted(p.name for p in (root / "xray_train").iterdir()) == ["x_0000.png", "x_0001.png"]
    stems = [f"toy_{i:04d}" for i in range(10)]
    assert sorted(p.name for p in (root / "toy").iterdir()) == [f"{s}.png" for s in stems]
    assert sorted(p.name for p in (root / "toy_label" / "pixel").iterdir()) == [f"{s}.nii.gz" for s in stems]
    assert sorted(p.name for p in (root / "toy_label" / "sample").iterdir()) == [f"{s}.nii.gz.txt" for s in stems]
    assert sorted(p.name for p in (root / "toy_dicom").iterdir()) == [f"{s}.dcm" for s in stems]
    meta = json.loads((root / "toy_label" / "anomalies.json").read_text())
    cases = meta["cases"]
    assert cases == json.loads(json.dumps(written["cases"])) and sorted(cases) == [f"{s}.nii.gz" for s in stems]
    assert [cases[f"{s}.nii.gz"]["label"] for s in stems] == [0] * 5 + [1] * 5  # the first half normal
    assert [cases[f"{s}.nii.gz"]["kinds"] for s in stems] == [["normal"]] * 5 + [[k] for k in ANOMALY_KINDS]

    # training images: 16-bit PNGs of the training subjects, none of them a toy subject
    png = Image.open(root / "xray_train" / "x_0001.png")
    assert png.mode == "I;16" and png.size == (size, size)
    expected = np.round(65535 * chest_radiograph(train_subject_seed(seed, 1), size)[0].astype(np.float64))
    assert np.array_equal(np.asarray(png), expected.astype(np.uint16))
    toy_normals = [chest_radiograph(toy_subject_seed(seed, i), size)[0] for i in range(10)]
    assert all(not np.array_equal(np.asarray(png), np.round(65535 * t)) for t in toy_normals)

    for i, stem in enumerate(stems):
        case = cases[f"{stem}.nii.gz"]
        assert (root / "toy_label" / "sample" / f"{stem}.nii.gz.txt").read_text().strip() == str(case["label"])
        normal, image, mask, _ = toy_case(i, 10, seed, size)
        raw = np.asarray(Image.open(root / "toy" / f"{stem}.png"))
        assert raw.dtype == np.uint16 and np.array_equal(raw, np.round(65535 * image.astype(np.float64)))
        # MONAI's LoadImage reads a PNG with PILReader: (columns, rows), the transpose of the picture
        loaded = _load(root / "toy" / f"{stem}.png")
        assert np.array_equal(loaded, raw.T)
        nifti = nib.load(root / "toy_label" / "pixel" / f"{stem}.nii.gz")
        label = np.asarray(nifti.dataobj)
        assert label.dtype == np.uint8 and label.shape == loaded.shape and np.array_equal(nifti.affine, np.eye(4))
        assert bool(label.any()) == bool(case["label"]) and set(np.unique(label)) <= {0, 1}
        if not case["label"]:
            continue
        # the label sits where the loaded image changed against a normal rendering of the same subject
        assert case["subject"] == toy_subject_seed(seed, i)
        reference = np.round(65535 * chest_radiograph(case["subject"], size)[0].astype(np.float64)).T
        changed = np.abs(loaded - reference) > MASK_TOLERANCE * 65535 + 1
        assert changed.any() and changed[label > 0].mean() > 0.8 and not (changed & (label == 0)).any()
        if not np.array_equal(label, label.T):  # and not in the picture's row-major order
            assert changed[label.T > 0].mean() < changed[label > 0].mean()
        (x0, x1), (y0, y1) = case["bbox"]  # in the label's (column, row) order
        assert label[x0:x1, y0:y1].sum() == label.sum()

        # the DICOM copy: DX For Presentation, 12 bits of the same picture
        dicom = root / "toy_dicom" / f"{stem}.dcm"
        header = pydicom.dcmread(dicom)
        assert header.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert header.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1" and header.Modality == "DX"
        assert (header.Rows, header.Columns, header.BitsAllocated, header.BitsStored) == (size, size, 16, 12)
        assert header.PhotometricInterpretation == "MONOCHROME2" and header.PixelRepresentation == 0
        assert np.array_equal(header.pixel_array, np.round(4095 * image.astype(np.float64)))
        # MONAI's PydicomReader transposes too (swap_ij=True): the same (columns, rows) as the PNG's load
        from_dicom = _load(dicom, reader="PydicomReader")
        assert from_dicom.shape == loaded.shape and np.array_equal(from_dicom, header.pixel_array.T)
        assert np.abs(from_dicom / 4095 - loaded / 65535).max() <= 0.5 / 4095 + 0.5 / 65535 + 1e-6


def test_write_dicom_radiograph_tags_window_and_deterministic_uids(tmp_path):
    image = np.zeros((40, 30), np.float32)
    image[5:10, 20:25] = 1.0  # a non-square picture with a bright block at the top right
    path = write_dicom_radiograph(tmp_path / "a" / "x.dcm", image, window=(1000, 2000), pixel_spacing=(0.5, 0.6))
    again = write_dicom_radiograph(tmp_path / "b" / "x.dcm", image, window=(1000, 2000), pixel_spacing=(0.5, 0.6))
    header = pydicom.dcmread(path)
    assert header.preamble is not None and pydicom.misc.is_dicom(path)
    assert (header.Rows, header.Columns) == (40, 30) and header.HighBit == 11
    assert [float(v) for v in header.PixelSpacing] == [0.5, 0.6]
    assert float(header.WindowCenter) == 1000 and float(header.WindowWidth) == 2000
    assert header.file_meta.MediaStorageSOPClassUID == header.SOPClassUID
    assert header.SOPInstanceUID == pydicom.dcmread(again).SOPInstanceUID  # deterministic
    assert len({header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID}) == 3
    assert all(pydicom.uid.UID(u).is_valid for u in (header.StudyInstanceUID, header.SOPInstanceUID))
    assert header.pixel_array[7, 22] == 4095 and header.pixel_array.sum() == 25 * 4095
    loaded = _load(path, reader="PydicomReader")
    assert loaded.shape == (30, 40) and loaded[22, 7] == 4095  # (columns, rows)
    assert "WindowCenter" not in pydicom.dcmread(write_dicom_radiograph(tmp_path / "c.dcm", image))


def test_the_command_line_writes_the_set_and_prints_one_line(tmp_path, capsys):
    written = main(["--output_dir", str(tmp_path), "--train", "1", "--toy", "2", "--size", "40", "--seed", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xray: 1 training images, 2 toy cases (1 anomalous)")
    assert written["n_toy"] == 2 and (tmp_path / "xray" / "toy" / "toy_0001.png").is_file()
    assert not (tmp_path / "xray" / "toy_dicom").exists()


def test_make_normals_for_xray_writes_the_datasets_training_images_and_the_bundle_lists_them(tmp_path):
    """`make normals DATASET=xray` (tools.phantoms) writes the training radiographs of write_xray_dataset with the
    same seed, flat in its folder, where the xray overlay's scan listing finds them."""
    from scripts.io.radiographs import list_radiographs
    from tools.phantoms import main as normals_main

    paths = normals_main(["--dataset", "xray", "--output_dir", str(tmp_path / "normals"), "--count", "3",
                          "--size", str(SIZE), "--seed", "4"])
    write_xray_dataset(tmp_path / "dataset", n_train=3, n_toy=0, seed=4, size=SIZE)
    assert [p.name for p in paths] == ["x_0000.png", "x_0001.png", "x_0002.png"]
    for path in paths:
        assert np.array_equal(np.asarray(Image.open(path)),
                              np.asarray(Image.open(tmp_path / "dataset" / "xray" / "xray_train" / path.name)))
    assert sorted(list_radiographs(tmp_path / "normals")) == sorted(str(p) for p in paths)
    with pytest.raises(ValueError, match="size must be at least"):
        normals_main(["--dataset", "xray", "--output_dir", str(tmp_path / "small"), "--size", "8"])
