"""Dataset discovery, data folds, the task/data-fold cross-validation and the anomaly datasets."""

from __future__ import annotations

import itertools
import random

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from scripts.data.datasets import SyntheticAnomalyDataset, compute_fingerprint, list_scans, random_patch
from scripts.data.splits import assign_folds, cross_validation_split, default_tasks, model_folds
from scripts.transforms import NormaliseIntensityd

SCANS = [f"/data/brain_train/{i:05d}.nii.gz" for i in range(53)]


def test_list_scans_finds_nifti_sorted_and_rejects_bad_folders(tmp_path):
    for name in ("b.nii.gz", "a.nii", "notes.txt", "c.NII.GZ"):
        (tmp_path / name).write_bytes(b"")
    assert [p.split("/")[-1] for p in list_scans(tmp_path, check_headers=False)] == ["a.nii", "b.nii.gz", "c.NII.GZ"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_scans(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no"):
        list_scans(empty)
    with pytest.raises(ValueError, match="cannot read scan .*a.nii"):
        list_scans(tmp_path)  # empty files are not NIfTI


def test_list_scans_rejects_a_2d_image(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8), dtype=np.float32), np.eye(4)), tmp_path / "flat.nii.gz")
    with pytest.raises(ValueError, match="flat.nii.gz.*not a 3D volume"):
        list_scans(tmp_path)


def test_folds_are_disjoint_covering_balanced_and_stable():
    folds = assign_folds(SCANS)
    assert set(folds) == set(SCANS)
    sizes = np.bincount(list(folds.values()), minlength=5)
    assert sizes.max() - sizes.min() <= 1
    shuffled = SCANS[:]
    random.Random(0).shuffle(shuffled)
    assert assign_folds(shuffled) == folds
    moved = {s.replace("/data/", "/elsewhere/"): f for s, f in folds.items()}
    assert assign_folds(list(moved)) == moved  # the parent folder does not matter, the file name does
    # not simply the listing order dealt round-robin
    assert [folds[s] for s in SCANS[:10]] != [i % 5 for i in range(10)]


@pytest.mark.parametrize("num_train_tasks, expected_models", [(1, 5), (2, 10), (3, 10), (4, 5)])
def test_cross_validation_follows_the_paper(num_train_tasks, expected_models):
    tasks = default_tasks(has_foreign=True)
    combos = model_folds(num_train_tasks)
    assert len(combos) == expected_models and combos == list(itertools.combinations(range(5), num_train_tasks))
    folds = assign_folds(SCANS)
    for fold, train_idx in enumerate(combos):
        split = cross_validation_split(SCANS, fold, num_train_tasks, tasks)
        held_out = tuple(i for i in range(5) if i not in train_idx)
        assert split.train_tasks == tuple(tasks[i] for i in train_idx)
        assert split.val_tasks == tuple(tasks[i] for i in held_out)
        # the larger group of data folds trains: the folds of the held-out tasks when training on 1 or 2 tasks
        larger, smaller = (held_out, train_idx) if len(held_out) > len(train_idx) else (train_idx, held_out)
        assert split.train_data_folds == larger and split.val_data_folds == smaller
        assert set(split.train_scans).isdisjoint(split.val_scans)
        assert set(split.train_scans) | set(split.val_scans) == set(SCANS)
        assert all(folds[s] in larger for s in split.train_scans)
    with pytest.raises(ValueError, match=f"fold must be in 0..{expected_models - 1}"):
        cross_validation_split(SCANS, expected_models, num_train_tasks, tasks)


def test_without_foreign_data_fpi_replaces_poisson_inter(caplog):
    with caplog.at_level("INFO"):
        tasks = default_tasks(has_foreign=False)
    assert tasks == ["poisson_intra", "fpi", "sink", "source", "smooth_intensity"]
    assert "fpi" in caplog.text and "poisson_inter" in caplog.text
    assert default_tasks(True) == ["poisson_intra", "poisson_inter", "sink", "source", "smooth_intensity"]


def test_fpi_only_baseline_uses_plain_k_fold():
    split = cross_validation_split(SCANS, 2, tasks=default_tasks(False), train_tasks=["fpi"])
    assert split.train_tasks == ("fpi",) and "fpi" not in split.val_tasks and len(split.val_tasks) == 4
    assert split.val_data_folds == (2,) and split.train_data_folds == (0, 1, 3, 4)


def test_too_few_scans_is_a_clear_error():
    with pytest.raises(ValueError, match="too few"):
        cross_validation_split(SCANS[:1], 0)


def preprocessed(count, spatial=(20, 18, 16), seed=0, scale=1.0, offset=0.0):
    from conftest import textured_scan

    items = []
    for i in range(count):
        image, foreground = textured_scan(spatial, seed=seed + i)
        items.append({"image": image * scale + offset, "foreground": foreground[None]})
    return items


def test_validation_set_is_fixed_and_about_half_normal():
    scans = preprocessed(6)
    tasks = ["fpi", "sink", "source", "smooth_intensity"]
    make = lambda: SyntheticAnomalyDataset(  # noqa: E731
        scans, tasks, NormaliseIntensityd(), anomaly_probability=0.5, fixed=True, seed=7
    )
    first, second = make(), make()
    assert len(first) == 24
    normal = 0
    for i in range(len(first)):
        a, b = first[i], second[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert torch.equal(first[i]["image"], a["image"])  # identical again in the next "epoch"
        assert a["anomaly_task"] in (tasks[i % 4], "none")
        normal += a["anomaly_task"] == "none"
    assert 6 <= normal <= 18
    capped = SyntheticAnomalyDataset(scans, tasks, NormaliseIntensityd(), fixed=True, seed=7, max_samples=10)
    assert len(capped) == 10


def test_training_samples_follow_the_random_state():
    scans = preprocessed(4)
    data = SyntheticAnomalyDataset(scans, ["sink", "fpi"], NormaliseIntensityd())
    data.set_random_state(3)
    first = [data[i]["image"] for i in range(4)]
    data.set_random_state(3)
    again = [data[i]["image"] for i in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(data[0]["image"], first[0])  # the next draw differs
    assert set(data[0]) == {"image", "label", "anomaly_task"}


def test_training_patches_are_cut_from_the_whole_sample_and_half_hold_an_anomaly():
    scans = preprocessed(4, spatial=(24, 20, 16))
    tasks = ["sink", "source", "smooth_intensity"]
    whole = SyntheticAnomalyDataset(scans, tasks, NormaliseIntensityd(), max_anomalies=1)
    patches = SyntheticAnomalyDataset(scans, tasks, NormaliseIntensityd(), max_anomalies=1, patch_size=[8, 8, 8])
    whole.set_random_state(5)
    patches.set_random_state(5)
    holding = 0
    for i in range(24):
        full, patch = whole[i % 4], patches[i % 4]
        assert set(patch) == {"image", "label", "anomaly_task"} and patch["anomaly_task"] == full["anomaly_task"]
        assert patch["image"].shape == patch["label"].shape == (1, 8, 8, 8)
        assert not isinstance(patch["image"], MetaTensor)  # a batch cannot mix MetaTensors and tensors
        # the same sample as without patches, cut afterwards: the anomalies keep their size on the scan's grid
        offsets = [o for o in itertools.product(range(17), range(13), range(9))
                   if torch.equal(full["image"][(slice(None), *(slice(a, a + 8) for a in o))], patch["image"])]
        assert offsets and any(torch.equal(full["label"][(slice(None), *(slice(a, a + 8) for a in o))],
                                           patch["label"]) for o in offsets)
        holding += bool((patch["label"] > 0).any())
    assert holding >= 12  # half of them around a labelled voxel, others holding one by chance
    patches.set_random_state(5)
    again = patches[0]
    patches.set_random_state(5)
    repeated = patches[0]
    assert torch.equal(repeated["image"], again["image"]), (repeated["label"] - again["label"]).abs().max()
    assert torch.equal(repeated["label"], again["label"]), (repeated["label"] - again["label"]).abs().max()


def test_a_patch_holds_its_voxel_anywhere_not_in_its_centre():
    # centred patches would teach the network that anomalies sit in the middle of its input
    label = torch.zeros(1, 40, 40, 40)
    label[0, 18:22, 18:22, 18:22] = 0.7
    foreground = torch.zeros(1, 40, 40, 40, dtype=torch.bool)
    foreground[0, 5:35, 5:35, 5:35] = True
    rng = np.random.RandomState(0)
    places, holding = [], 0
    for _ in range(400):
        window = random_patch(label, foreground, [16, 16, 16], rng)
        assert all(0 <= w.start and w.stop <= 40 and w.stop - w.start == 16 for w in window)
        assert bool(foreground[0][window].any())
        if bool((label[0][window] > 0).any()):
            holding += 1
            places.append(20 - window[0].start)  # where the anomaly sits along the first axis of the patch
    assert 170 <= holding <= 300  # about half chosen around the anomaly, a few more holding it by chance
    counts = np.bincount(np.clip(places, 0, 19), minlength=20)
    assert counts[:8].sum() > 0.25 * len(places) and counts[12:].sum() > 0.25 * len(places)
    normal = torch.zeros_like(label)  # no anomaly: around a foreground voxel
    assert all(bool(foreground[0][random_patch(normal, foreground, [8, 8, 8], rng)].any()) for _ in range(50))
    with pytest.raises(ValueError, match="larger than the sample"):
        random_patch(label, foreground, [48, 16, 16], rng)


def test_poisson_inter_needs_foreign_scans():
    scans = preprocessed(3)
    data = SyntheticAnomalyDataset(scans, ["poisson_inter", "sink"], NormaliseIntensityd())
    assert data.tasks == ["sink"]
    with_foreign = SyntheticAnomalyDataset(
        scans, ["poisson_inter"], NormaliseIntensityd(), foreign=preprocessed(2, spatial=(22, 20, 18), seed=9)
    )
    assert with_foreign[0]["anomaly_task"] == "poisson_inter"


def test_fingerprint_normalisation_is_the_same_for_hounsfield_and_rescaled_ct():
    hu = preprocessed(5, scale=10.0, offset=-1000.0)
    unit = preprocessed(5, scale=10.0 / 2400.0, offset=0.0)  # (HU + 1000) / 2400: a [0, 1] rescaling
    out_hu = NormaliseIntensityd(mode="fingerprint", fingerprint=compute_fingerprint(hu))(hu[0])["image"]
    out_unit = NormaliseIntensityd(mode="fingerprint", fingerprint=compute_fingerprint(unit))(unit[0])["image"]
    assert torch.allclose(out_hu, out_unit, atol=1e-3)
    fg = hu[0]["foreground"][0]
    assert abs(float(out_hu[0][fg].mean())) < 0.5


def test_fingerprint_written_and_read_back(tmp_path):
    from scripts.io.files import save_json

    fingerprint = compute_fingerprint(preprocessed(3))
    path = save_json(fingerprint, tmp_path / "fingerprint.json")
    a = NormaliseIntensityd(mode="fingerprint", fingerprint=path)(preprocessed(1)[0])["image"]
    b = NormaliseIntensityd(mode="fingerprint", fingerprint=fingerprint)(preprocessed(1)[0])["image"]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="fingerprint"):
        NormaliseIntensityd(mode="fingerprint")
