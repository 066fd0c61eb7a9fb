"""The chest radiograph phantom (tools/xray_phantom.py): deterministic subjects, anatomy where it belongs, each
held-out anomaly kind inside its label, and the dataset layout read back as the bundle reads it."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from monai.transforms import LoadImage

from scripts.radiographs import RadiographReader
from tools.xray_phantom import ANOMALY_KINDS, _anatomy, add_anomaly, chest_radiograph, write_xray_dataset


def test_subjects_are_deterministic_and_anatomy_sits_where_it_belongs():
    image, body = chest_radiograph(5, 96)
    again, _ = chest_radiograph(5, 96)
    assert np.array_equal(image, again) and not np.array_equal(image, chest_radiograph(6, 96)[0])
    assert image.dtype == np.float32 and 0 <= image.min() and image.max() <= 1
    anatomy = _anatomy(np.random.default_rng(5), 96)
    lungs = anatomy["lungs"][0] | anatomy["lungs"][1]
    air = ~body
    assert image[air].mean() < image[lungs].mean() < image[anatomy["heart"]].mean()


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_each_anomaly_changes_the_image_inside_its_label(kind):
    normal, body = chest_radiograph(11, 96)
    image, mask = add_anomaly(11, kind, 96)
    assert mask.any() and mask.shape == image.shape
    assert (mask & body).sum() >= 0.9 * mask.sum()
    changed = np.abs(image - normal) > 0.02
    assert changed[mask].mean() > 0.5  # the label marks what changed
    assert (changed & ~mask).sum() < 0.5 * mask.sum() + 5  # and little changes outside it (soft edges)


def test_the_dataset_reads_back_as_the_bundle_reads_it(tmp_path):
    written = write_xray_dataset(tmp_path, n_train=2, n_toy=10, seed=1, size=64, dicom=True)
    root = tmp_path / "xray"
    assert sorted(p.name for p in (root / "xray_train").iterdir()) == ["x_0000.png", "x_0001.png"]
    cases = json.loads((root / "toy_label/anomalies.json").read_text())["cases"]
    assert cases == written["cases"] and sum(c["label"] for c in cases.values()) == 5
    assert {c["kinds"][0] for c in cases.values() if c["label"]} == set(ANOMALY_KINDS)
    load = LoadImage(reader=RadiographReader(), image_only=True)
    for name, case in cases.items():
        stem = name.removesuffix(".nii.gz")
        label = np.asarray(nib.load(root / "toy_label/pixel" / name).dataobj)
        png = np.asarray(load(str(root / "toy" / f"{stem}.png")))
        assert label.shape == png.shape == (64, 64)
        assert int((root / "toy_label/sample" / f"{name}.txt").read_text()) == case["label"]
        assert bool(label.any()) == bool(case["label"])
        if case["label"]:  # the label sits where this image differs from the subject's normal one (reader order)
            subject = int(stem.split("_")[1])
            normal = np.round(chest_radiograph(2_000_003 + 1000 + subject, 64)[0] * 65535).T
            changed = np.abs(png - normal) > 0.02 * 65535
            assert changed[label > 0].mean() > 0.5
        dicom = root / "toy_dicom" / f"{stem}.dcm"
        header = pydicom.dcmread(dicom)
        assert header.Modality == "DX" and float(header.WindowCenter) == 2048
        np.testing.assert_allclose(np.asarray(load(str(dicom))) / 4095, png / 65535, atol=1e-3)
