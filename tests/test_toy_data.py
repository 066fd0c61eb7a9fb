"""MOOD-layout toy data (tools.toy_data): layout, labels, determinism, anatomy, every anomaly kind."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from tools import toy_data
from tools.toy_data import ANOMALY_KINDS, apply_anomaly, brain_scan, normal_scan, toy_case, write_toy_dataset

SIZE, N_TRAIN, N_TOY = 48, 2, 6


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    for dataset in ("brain", "abdom"):
        write_toy_dataset(root, dataset, n_train=N_TRAIN, n_toy=N_TOY, size=SIZE, seed=0)
    return root


def _load(path):
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


@pytest.mark.parametrize("dataset", ["brain", "abdom"])
def test_layout_and_names(toy_root, dataset):
    base = toy_root / dataset
    assert sorted(p.name for p in (base / f"{dataset}_train").iterdir()) == ["00000.nii.gz", "00001.nii.gz"]
    names = [f"toy_{i}.nii.gz" for i in range(N_TOY)]
    assert sorted(p.name for p in (base / "toy").iterdir()) == sorted(names)
    assert sorted(p.name for p in (base / "toy_label" / "pixel").iterdir()) == sorted(names)
    assert sorted(p.name for p in (base / "toy_label" / "sample").iterdir()) == sorted(n + ".txt" for n in names)
    meta = json.loads((base / "toy_label" / "anomalies.json").read_text())
    assert sorted(meta["cases"]) == sorted(names)
    train, _ = _load(base / f"{dataset}_train" / "00000.nii.gz")
    assert train.shape == (SIZE,) * 3
    assert train.dtype == (np.float32 if dataset == "brain" else np.int16)


@pytest.mark.parametrize("dataset", ["brain", "abdom"])
def test_scans_masks_and_sample_labels_agree(toy_root, dataset):
    base = toy_root / dataset
    meta = json.loads((base / "toy_label" / "anomalies.json").read_text())["cases"]
    labels = []
    for i in range(N_TOY):
        name = f"toy_{i}.nii.gz"
        scan, affine = _load(base / "toy" / name)
        mask, mask_affine = _load(base / "toy_label" / "pixel" / name)
        assert scan.shape == mask.shape == (SIZE,) * 3
        np.testing.assert_array_equal(affine, mask_affine)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        label = int((base / "toy_label" / "sample" / (name + ".txt")).read_text().strip())
        assert label == int(mask.any()) == meta[name]["label"]
        if label:
            assert meta[name]["kinds"] != ["normal"] and set(meta[name]["kinds"]) <= set(ANOMALY_KINDS)
            (x0, x1), (y0, y1), (z0, z1) = meta[name]["bbox"]
            assert mask[x0:x1, y0:y1, z0:z1].sum() == mask.sum()
        else:
            assert meta[name]["kinds"] == ["normal"] and meta[name]["bbox"] is None
        labels.append(label)
    assert sum(labels) == N_TOY // 2  # exactly one anomalous case per pair


@pytest.mark.parametrize("dataset", ["brain", "abdom"])
def test_mask_is_exactly_the_changed_voxels(toy_root, dataset):
    for i in range(N_TOY):
        normal, anomalous, mask, info = toy_case(dataset, i, SIZE, seed=0)
        np.testing.assert_array_equal(mask.astype(bool), anomalous != normal)
        assert info["label"] == int(mask.any())
        written, _ = _load(toy_root / dataset / "toy" / f"toy_{i}.nii.gz")
        np.testing.assert_array_equal(written, anomalous)
        written_mask, _ = _load(toy_root / dataset / "toy_label" / "pixel" / f"toy_{i}.nii.gz")
        np.testing.assert_array_equal(written_mask, mask)


def test_about_half_normal_over_many_cases():
    flags = [toy_data._case_plan(i, seed)[0] for seed in range(3) for i in range(20)]
    assert sum(flags) == len(flags) // 2


def test_deterministic_in_seed(toy_root, tmp_path):
    same, other = tmp_path / "same", tmp_path / "other"
    write_toy_dataset(same, "brain", n_train=1, n_toy=2, size=SIZE, seed=0)
    write_toy_dataset(other, "brain", n_train=1, n_toy=2, size=SIZE, seed=1)
    for rel in ("brain/brain_train/00000.nii.gz", "brain/toy/toy_0.nii.gz", "brain/toy/toy_1.nii.gz",
                "brain/toy_label/pixel/toy_0.nii.gz", "brain/toy_label/pixel/toy_1.nii.gz"):
        np.testing.assert_array_equal(_load(same / rel)[0], _load(toy_root / rel)[0])
    assert not np.array_equal(_load(other / "brain/brain_train/00000.nii.gz")[0],
                              _load(same / "brain/brain_train/00000.nii.gz")[0])
    assert not np.array_equal(_load(other / "brain/toy/toy_0.nii.gz")[0], _load(same / "brain/toy/toy_0.nii.gz")[0])
    a, b = normal_scan("abdom", SIZE, 5)[0], normal_scan("abdom", SIZE, 5)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, normal_scan("abdom", SIZE, 6)[0])


def test_brain_anatomy_t2_contrast():
    vol, brain, tissues = brain_scan(SIZE, subject=3, return_tissues=True)
    assert vol.dtype == np.float32 and vol.min() >= 0.0 and vol.max() <= 1.0
    assert np.all(vol[~brain] == 0.0) and 0.15 < brain.mean() < 0.5
    mean = {k: float(vol[brain & (tissues[k] > 0.6)].mean()) for k in ("csf", "gm", "wm")}
    assert mean["csf"] > mean["gm"] > mean["wm"], mean
    # against the undeformed template maps too (the deformation is small)
    maps = toy_data.mni152_tissues(SIZE)
    mean = {k: float(vol[brain & (maps[k] > 0.6)].mean()) for k in ("csf", "gm", "wm")}
    assert mean["csf"] > mean["gm"] > mean["wm"], mean


def test_abdomen_anatomy_hu():
    vol, body = normal_scan("abdom", SIZE, 2)
    assert vol.dtype == np.int16
    assert np.all(vol[~body] == -1000) and 0.2 < body.mean() < 0.6
    inside = vol[body]
    assert ((inside > -150) & (inside < -50)).mean() > 0.1  # fat
    assert ((inside > 20) & (inside < 90)).mean() > 0.1  # soft tissue and organs
    assert (inside > 300).sum() > 20  # bone


def test_abdomen_upsampled_above_256(monkeypatch):
    calls = []

    def fake(size, seed):
        calls.append(size)
        return np.full((size,) * 3, 40.0, np.float32), np.ones((size,) * 3, bool)

    monkeypatch.setattr(toy_data, "ct_phantom", fake)
    vol, body = toy_data.abdom_scan(260, 0)
    assert calls == [130] and vol.shape == body.shape == (260,) * 3


@pytest.mark.parametrize("dataset", ["brain", "abdom"])
@pytest.mark.parametrize("kind", list(ANOMALY_KINDS))
def test_every_kind_changes_the_foreground(dataset, kind):
    vol, fg = normal_scan(dataset, SIZE, 1)
    out, info = apply_anomaly(kind, vol, fg, np.random.default_rng(4), dataset)
    changed = out != vol
    assert info["kind"] == kind and info["bbox"] is not None and changed.any()
    assert out.dtype == vol.dtype and not np.any(changed & ~fg)  # only inside the foreground
    (x0, x1), (y0, y1), (z0, z1) = info["bbox"]
    assert changed[x0:x1, y0:y1, z0:z1].sum() == changed.sum()
    if dataset == "brain":
        assert out.min() >= 0.0 and out.max() <= 1.0
    if kind == "missing_slab":
        assert np.all(out[changed] == (0 if dataset == "brain" else -1000))
    if kind == "foreign_object":
        assert np.unique(out[changed]).size == 1


def test_every_kind_appears_in_a_toy_set():
    kinds = {k for i in range(2 * len(ANOMALY_KINDS)) for k in toy_data._case_plan(i, seed=0)[1]}
    assert kinds == set(ANOMALY_KINDS)


def test_cli(tmp_path, capsys):
    toy_data.main(["--output_dir", str(tmp_path), "--datasets", "abdom", "--size", "32", "--train", "1",
                   "--toy", "2", "--seed", "3"])
    assert (tmp_path / "abdom" / "abdom_train" / "00000.nii.gz").is_file()
    assert (tmp_path / "abdom" / "toy_label" / "sample" / "toy_1.nii.gz.txt").is_file()
    assert not (tmp_path / "brain").exists()
    assert "abdom" in capsys.readouterr().out


def _zscore_ap(dataset: str, variability: str) -> float:
    """The pixel AP (all voxels of 6 toy cases pooled, as MOOD pools them) of bench-quality's z-score baseline,
    ``|x - mean| / (std + 0.01)`` voxel by voxel against 4 training normals, in MOOD's [0, 1] convention."""
    from sklearn.metrics import average_precision_score

    def mood(volume):
        volume = volume.astype(np.float32)
        return volume if dataset == "brain" else (volume + 1024.0) / 4095.0

    train = np.stack([mood(normal_scan(dataset, 48, s, variability)[0]) for s in range(4)])
    mean, std = train.mean(0), train.std(0)
    scores, labels = [], []
    for index in range(6):
        _, anomalous, mask, _ = toy_case(dataset, index, 48, seed=5, variability=variability)
        scores.append((np.abs(mood(anomalous) - mean) / (std + 0.01)).ravel())
        labels.append(mask.ravel())
    return float(average_precision_score(np.concatenate(labels), np.concatenate(scores)))


@pytest.mark.parametrize("dataset", ["brain", "abdom"])
def test_cohort_subjects_vary_as_a_real_cohort_and_stay_in_range(dataset):
    phantom, phantom_fg = normal_scan(dataset, 32, 7)
    varied, varied_fg = normal_scan(dataset, 32, 7, variability="cohort")
    again, _ = normal_scan(dataset, 32, 7, variability="cohort")
    assert np.array_equal(varied, again)  # deterministic in the subject
    assert varied.dtype == phantom.dtype and varied.shape == phantom.shape
    if dataset == "brain":
        assert 0.0 <= varied.min() and varied.max() <= 1.0 and (varied[~varied_fg] == 0).all()
    else:
        assert -1000 <= varied.min() and varied.max() <= 1650 and (varied[~varied_fg] == -1000).all()
    dice = 2 * (phantom_fg & varied_fg).sum() / (phantom_fg.sum() + varied_fg.sum())
    assert 0.6 < dice < 0.97  # moved, scaled and warped, still the same anatomy


@pytest.mark.parametrize("dataset", ["brain", "abdom"])
def test_cohort_subjects_differ_more_than_phantoms(dataset):
    def spread(variability):  # voxel-wise standard deviation over 4 subjects, in their foreground
        scans = [normal_scan(dataset, 48, s, variability) for s in range(4)]
        volumes = np.stack([v.astype(np.float32) for v, _ in scans])
        return float(volumes.std(0)[np.any([f for _, f in scans], axis=0)].mean())

    assert spread("cohort") > 1.05 * spread("phantom")


def test_cohort_variability_does_not_flatter_a_voxel_wise_zscore():
    # brains that differ as a real cohort's: comparing voxel by voxel without registration finds less (the CT
    # phantoms' bowel gas, placed anew in every subject, already dominates the z-score at this size)
    assert _zscore_ap("brain", "cohort") < 0.6 * _zscore_ap("brain", "phantom")


def test_cohort_toy_cases_label_exactly_the_changed_voxels(tmp_path):
    written = write_toy_dataset(tmp_path, "abdom", n_train=1, n_toy=2, size=32, seed=0, variability="cohort")
    meta = json.loads((tmp_path / "abdom" / "toy_label" / "anomalies.json").read_text())
    assert meta["variability"] == "cohort"
    normal, anomalous, mask, info = toy_case("abdom", 1, 32, seed=0, variability="cohort")
    assert np.array_equal(mask.astype(bool), anomalous != normal) and info["label"] == int(mask.any())
    assert len(written["train"]) == 1
    with pytest.raises(ValueError, match="variability"):
        normal_scan("brain", 32, 0, variability="cohorts")
