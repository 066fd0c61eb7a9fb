"""The voxel classifier: its feature bank, its training through the repository's command (plan, folds, files with
their SHA-256), inference in every mode through the same commands as the networks, and its refusals."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from scripts.classifier.features import (
    FEATURE_GROUPS,
    FeatureBank,
    NormativeStatistics,
    feature_settings,
    scored_voxels,
)
from tests.conftest import textured_scan

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [str(ROOT / "bundle/configs" / n) for n in ("common.yaml", "train.yaml", "brain.yaml", "classifier.yaml")]
TINY = ["--spatial_size", "[32,32,32]", "--classifier_samples", "4", "--classifier_voxels_per_sample", "400",
        "--max_val_samples", "6", "--classifier_val_maps", "3", "--num_workers", "0", "--classifier_fuse_with", ""]


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "bundle")}


def normalised(seed: int, spatial=(24, 26, 22)) -> np.ndarray:
    image, foreground = textured_scan(spatial, seed)
    image = image[0].numpy()
    return (image - image[foreground.numpy()].mean()) / image[foreground.numpy()].std()


def test_features_are_deterministic_named_and_follow_the_groups():
    image = normalised(0)
    settings = feature_settings()
    normative = NormativeStatistics.from_scans([normalised(s) for s in (1, 2, 3)], settings)
    bank = FeatureBank(settings)
    rows = bank.rows(bank.shared(image), normative)
    again = FeatureBank(settings).rows(FeatureBank(settings).shared(image.copy()), normative)
    assert rows.dtype == np.float32 and rows.shape[1] == len(bank.names()) == 25
    assert np.array_equal(rows, again) and np.isfinite(rows).all()
    assert all(rows[:, i].std() > 0 for i in range(rows.shape[1]))  # every feature says something here
    for left_out in FEATURE_GROUPS:
        groups = [g for g in FEATURE_GROUPS if g != left_out]
        smaller = FeatureBank(feature_settings(groups))
        kept = [bank.names().index(n) for n in smaller.names()]
        assert len(kept) < rows.shape[1]
        np.testing.assert_array_equal(smaller.rows(smaller.shared(image), normative), rows[:, kept])
    with pytest.raises(ValueError, match="subset of"):
        feature_settings(["texture", "colour"])
    with pytest.raises(ValueError, match="normals' statistics"):
        bank.rows(bank.shared(image))


def test_features_follow_the_anatomy_wherever_it_lies_in_the_grid():
    """The box, mirror, normative and position features are the anatomy's: the same scan placed elsewhere in another
    grid gets the same rows (the half-resolution entropy and edge distance up to their resampling)."""
    bank = FeatureBank(feature_settings())
    image = normalised(4)
    normative = NormativeStatistics.from_scans([normalised(s) for s in (1, 2)], bank.settings)
    rows = []
    for grid, offset in (((36, 36, 36), (4, 6, 6)), ((40, 38, 42), (8, 4, 10))):
        placed = np.full(grid, image.min(), np.float32)
        placed[tuple(slice(o, o + n) for o, n in zip(offset, image.shape))] = image
        rows.append(bank.rows(bank.shared(placed), normative))
    assert rows[0].shape == rows[1].shape
    resampled = [bank.names().index(n) for n in ("entropy_2", "edge_distance")]
    exact = [i for i in range(rows[0].shape[1]) if i not in resampled]
    np.testing.assert_allclose(rows[0][:, exact], rows[1][:, exact], atol=1e-4)
    np.testing.assert_allclose(rows[0][:, resampled].mean(0), rows[1][:, resampled].mean(0), rtol=0.05, atol=0.05)


def test_the_scored_voxels_are_the_grown_anatomy_with_its_holes_and_old_plans_keep_their_box():
    """A ball in a grid: the voxels scored are the ball grown by the margin, with a cavity inside it and a notch
    cut into its surface (narrower than twice the margin) counted, the box's corners left out; a plan recorded before
    ``score_margin`` existed still scores its whole box."""
    grid = np.indices((40, 40, 40)).astype(np.float32)
    radius = np.sqrt(((grid - 20) ** 2).sum(0))
    settings = feature_settings()

    def scored_of(image):
        voxels, box = scored_voxels(image, settings)
        scored = np.zeros(image.shape, bool)
        scored.reshape(-1)[voxels] = True
        return scored, box

    image = np.where(radius <= 12, 1.0, 0.0).astype(np.float32)
    scored, box = scored_of(image)
    margin = settings["score_margin"]  # steps to a face neighbour: about margin / sqrt(3) or more in any direction
    assert scored[radius <= 12 + margin / 2].all() and not scored[radius > 12 + margin + 1].any()
    assert scored.sum() < np.prod([b.stop - b.start for b in box])
    image[radius <= 4] = 0.0                                        # a cavity
    image[18:23, 18:23, 26:33] = 0.0                                # a notch from the surface inwards
    scored, _ = scored_of(image)
    assert scored[radius <= 4].all() and scored[18:23, 18:23, 26:33].all()
    old = {k: v for k, v in settings.items() if k != "score_margin"}
    box_voxels, box = scored_voxels(image, FeatureBank(old).settings)
    assert len(box_voxels) == np.prod([b.stop - b.start for b in box])


@pytest.fixture(scope="module")
def trained(normal_scans, tmp_path_factory):
    """The classifier trained through ``scripts.training`` on ten tiny brain normals (every fold, calibrated)."""
    run = tmp_path_factory.mktemp("classifier") / "run"
    command = [sys.executable, "-m", "scripts.training", "--config_file", *CONFIGS, "--output_dir", str(run),
               "--dataset_dir", str(normal_scans["brain"]), "--cache_dir", str(run.parent / "cache"), *TINY]
    result = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return run / "models"


def test_training_writes_the_plan_the_folds_and_their_hashes(trained):
    folder = trained / "brain"
    plan = json.loads((folder / "plans.json").read_text())
    assert plan["network"] is None
    record = plan["classifier"]
    assert record["features"]["groups"] == list(FEATURE_GROUPS) and record["features"]["version"] == 1
    assert record["learner"]["library"] == "lightgbm"
    folds = [f["fold"] for f in plan["split"]["model_folds"]]
    assert len(folds) == 5
    import hashlib

    for k in folds:
        for name in (f"classifier_{k}.txt", f"normative_{k}.npz"):
            assert record["files"][name] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
        fold = json.loads((folder / f"fold_{k}.json").read_text())
        assert fold["kind"] == "voxel_classifier" and 0 <= fold["best_metric"] <= 1
        assert set(fold["split"]["val_tasks"]).isdisjoint(fold["split"]["train_tasks"])
        assert set(fold["per_task_pixel_ap"]) == set(fold["val_tasks"])  # each held-out task on its own
        assert (folder / f"classifier_{k}.txt").read_text().startswith("tree")  # LightGBM's text model
    assert plan["operating_points"]["sample"]["thresholds"]
    assert plan["operating_points"]["folds"] == record["files"]  # measured with these trees and statistics


def test_operating_points_of_another_classifier_are_not_used(trained, tmp_path):
    """A classifier fold retrained since the calibration (its file and the plan's hash both new) is another
    ensemble: its scans are not flagged."""
    from scripts.classifier.features import sha256_of
    from scripts.inference.operating_points import operating_point
    from scripts.plans import load_plan

    models = tmp_path / "models"
    shutil.copytree(trained, models)
    assert operating_point(load_plan(models, "brain"), models, "brain", 0.05, 0.001)["sample_threshold"] is not None
    folder = models / "brain"
    shutil.copyfile(folder / "classifier_0.txt", folder / "classifier_1.txt")
    plan = json.loads((folder / "plans.json").read_text())
    plan["classifier"]["files"]["classifier_1.txt"] = sha256_of(folder / "classifier_1.txt")
    (folder / "plans.json").write_text(json.dumps(plan))
    point = operating_point(load_plan(models, "brain"), models, "brain", 0.05, 0.001)
    assert point["sample_threshold"] is None and point["voxel_threshold"] is None


def predict(models: Path, inputs: Path, output: Path, mode: str, check: bool = True):
    result = subprocess.run([sys.executable, "-m", "scripts.predict", "-i", str(inputs), "-o", str(output), "-d",
                             "brain", "-m", str(models), "--mode", mode], env=environment(), capture_output=True,
                            text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_predict_in_every_mode_and_the_same_maps_in_any_intensity_convention(trained, normal_scans, tmp_path):
    source = nib.load(sorted(Path(normal_scans["brain"]).glob("*.nii.gz"))[0])
    volume = np.asanyarray(source.dataobj).astype(np.float64)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, convert in {"unit": lambda x: x, "scanner": lambda x: x * 1000 + 100,
                          "affine": lambda x: x * 3 + 100}.items():
        nib.save(nib.Nifti1Image(convert(volume).astype(np.float32), source.affine), inputs / f"{name}.nii.gz")
    written = {}
    for mode in ("pixel", "sample", "both"):
        predict(trained, inputs, tmp_path / mode, mode)
        written[mode] = {p.name: p.read_bytes() for p in (tmp_path / mode).iterdir()}
    assert written["both"] == {**written["pixel"], **written["sample"]}
    names = ("unit", "scanner", "affine")
    maps = {n: np.asanyarray(nib.load(tmp_path / "pixel" / f"{n}.nii.gz").dataobj) for n in names}
    assert maps["unit"].shape == volume.shape and maps["unit"].std() > 0
    assert 0 <= maps["unit"].min() and maps["unit"].max() <= 1
    for name in ("scanner", "affine"):
        np.testing.assert_allclose(maps[name], maps["unit"], atol=2e-3, err_msg=name)
    scores = {n: float((tmp_path / "sample" / f"{n}.nii.gz.txt").read_text()) for n in names}
    assert max(scores.values()) - min(scores.values()) < 2e-3


@pytest.mark.parametrize("name", ["classifier_0.txt", "normative_1.npz"])
def test_a_changed_file_is_refused_and_nothing_is_unpickled(trained, normal_scans, tmp_path, monkeypatch, name):
    from scripts.classifier.model import load_classifier
    from scripts.plans import load_plan

    models = tmp_path / "models"
    shutil.copytree(trained, models)
    plan = load_plan(models, "brain")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a classifier file was unpickled")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    ensemble = load_classifier(models, "brain", plan)  # reads every file without unpickling anything
    assert len(ensemble.folds) == 5
    path = models / "brain" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{name}.*refused.*SHA-256"):
        load_classifier(models, "brain", plan)
    monkeypatch.undo()
    result = predict(models, Path(normal_scans["brain"]), tmp_path / "out", "sample", check=False)
    assert result.returncode != 0 and "refused" in result.stdout + result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_partial_classifier_ensemble_is_refused_unless_allowed(trained, tmp_path):
    from scripts.classifier.model import load_classifier
    from scripts.plans import load_plan

    models = tmp_path / "models"
    shutil.copytree(trained, models)
    (models / "brain" / "classifier_3.txt").unlink()
    plan = load_plan(models, "brain")
    with pytest.raises(ValueError, match=r"4 of the 5 classifier folds .*\[3\] missing"):
        load_classifier(models, "brain", plan)
    assert len(load_classifier(models, "brain", plan, allow_partial=True).folds) == 4


def test_the_ensemble_keeps_the_batch_contract(trained):
    from scripts.classifier.model import load_classifier
    from scripts.plans import load_plan

    ensemble = load_classifier(trained, "brain", load_plan(trained, "brain"))
    batch = torch.from_numpy(np.stack([normalised(5, (32, 32, 32)), normalised(6, (32, 32, 32))]))[:, None]
    out = ensemble(batch)
    assert out.shape == batch.shape and out.dtype == torch.float32
    assert torch.equal(out[1:], ensemble(batch[1:]))  # each scan of a batch alone
    assert 0 <= float(out.min()) and float(out.max()) <= 1


def test_coarse_to_fine_scoring_keeps_the_top_of_the_map_and_scores_fewer_voxels(trained, tmp_path):
    """Coarse-to-fine scoring (the plan's ``classifier.scoring``): refining every share gives the trees' map exactly;
    a small share keeps the top of the map exact, interpolates the rest within its coarse neighbours' range, and
    the trees see fewer voxels."""
    from scripts.classifier.model import VoxelClassifierEnsemble, load_classifier, scoring_record
    from scripts.plans import load_plan

    plan = load_plan(trained, "brain")
    assert plan["classifier"]["scoring"] == scoring_record()  # training records the default
    ensemble = load_classifier(trained, "brain", plan)
    assert ensemble.scoring == plan["classifier"]["scoring"]
    image = normalised(9, (40, 37, 34))  # an odd side: the lattice ends on the last voxel; even ones: one before
    exact = VoxelClassifierEnsemble(ensemble.bank, ensemble.folds).scan_map(image)
    every = VoxelClassifierEnsemble(ensemble.bank, ensemble.folds, scoring_record(2, 1.0))
    assert np.array_equal(every.scan_map(image), exact) and every.last_fraction_scored == 1.0
    coarse = VoxelClassifierEnsemble(ensemble.bank, ensemble.folds, scoring_record(2, 0.05))
    approx = coarse.scan_map(image)
    assert coarse.last_fraction_scored < 0.8  # a tiny scan: the edge, refined whole, is much of it
    lattice = exact[0, ::2, ::2, ::2]
    assert np.array_equal(approx[0, ::2, ::2, ::2], lattice)  # the lattice is the trees'
    threshold = np.quantile(lattice[lattice > 0], 0.95)
    for j in np.argwhere(lattice >= threshold):  # within one coarse step of the top 5 %: the trees'
        region = tuple(slice(max(2 * int(c) - 2, 0), 2 * int(c) + 4) for c in j)
        assert np.array_equal(approx[0][region], exact[0][region])
    # a voxel the trees did not see is interpolated from scored lattice points only (no 0 from outside the edge)
    lattice_scored = np.zeros(exact.shape[1:], bool)
    lattice_scored[::2, ::2, ::2] = exact[0, ::2, ::2, ::2] > 0
    shape = np.array(exact.shape[1:])
    for voxel in np.argwhere(approx[0] != exact[0]):
        low = voxel // 2 * 2
        high = np.minimum(np.where(voxel % 2 == 1, low + 2, low), (shape - 1) // 2 * 2)
        corners = [(a, b, c) for a in {low[0], high[0]} for b in {low[1], high[1]} for c in {low[2], high[2]}]
        assert all(lattice_scored[corner] for corner in corners), voxel
    assert approx.min() >= 0 and approx.max() <= exact.max()
    assert np.array_equal(approx > 0, exact > 0)  # the same voxels scored
    assert np.array_equal(coarse.scan_map(image), approx)  # deterministic
    assert scoring_record(1) is None and scoring_record(None) is None
    # how inference reads the trees is no setup of training: a run of an earlier plan goes on with this one
    from scripts.plans import ensure_plan

    earlier = json.loads(json.dumps(plan))
    del earlier["classifier"]["scoring"]
    ensure_plan(tmp_path, earlier)
    ensure_plan(tmp_path, plan)
    for bad in ({"refine_top": 0.0}, {"refine_top": 1.5}, {"coarse_stride": 0}):
        with pytest.raises(ValueError, match="refine_top"):
            scoring_record(**bad)


def test_fusion_is_chosen_on_the_validation_recorded_and_applied(trained, normal_scans, tmp_path):
    """Training with --classifier_fuse_with scores each fold's validation with that fold's network too and records
    the best candidate; inference applies the plan's fusion: a weighted mean of the two ensembles' maps."""
    from scripts.classifier.fusion import CANDIDATES, MIN_GAIN, candidate_name
    from scripts.networks import build_network
    from scripts.plans import default_plan, ensure_plan, load_plan

    networks = tmp_path / "networks"
    plan = default_plan("brain", spatial_size=[32, 32, 32])
    plan["split"] = load_plan(trained, "brain")["split"]  # networks trained on the same tasks per fold
    ensure_plan(networks / "brain", plan)
    for k in range(5):
        torch.manual_seed(k)
        torch.save(build_network(plan).state_dict(), networks / "brain" / f"fold_{k}.pt")
    run = tmp_path / "run"
    command = [sys.executable, "-m", "scripts.training", "--config_file", *CONFIGS, "--output_dir", str(run),
               "--dataset_dir", str(normal_scans["brain"]), "--cache_dir", str(tmp_path / "cache"), *TINY,
               "--classifier_fuse_with", str(networks), "--no_calibration"]
    result = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    folder = run / "models" / "brain"
    fused = json.loads((folder / "plans.json").read_text())
    fusion = fused["fusion"]
    folds = [json.loads((folder / f"fold_{k}.json").read_text())["fusion_validation"] for k in range(5)]
    means = {candidate_name(m, w): np.mean([f[candidate_name(m, w)] for f in folds]) for m, w in CANDIDATES}
    chosen, alone = means[candidate_name(fusion["method"], fusion["classifier_weight"])], means["weighted_mean_1"]
    if max(means.values()) >= alone * (1 + MIN_GAIN):
        assert chosen == pytest.approx(max(means.values()))
    else:  # no candidate gains enough over the classifier alone: the networks are left out
        assert fusion["classifier_weight"] == 1.0
    assert fusion["min_gain"] == MIN_GAIN
    assert fusion["networks_kept"] == (fusion["classifier_weight"] != 1.0)
    assert (fused["network"] is not None) == fusion["networks_kept"]

    # applied: with the networks kept at weight 0.5, the map is the mean of the two kinds' maps
    variants = {"fused": tmp_path / "fused", "classifier_alone": tmp_path / "classifier_alone", "networks": networks}
    for name, network in (("fused", plan["network"]), ("classifier_alone", None)):
        folder = variants[name] / "brain"
        shutil.copytree(run / "models" / "brain", folder)
        for k in range(5):
            shutil.copyfile(networks / "brain" / f"fold_{k}.pt", folder / f"fold_{k}.pt")
        edited = json.loads((folder / "plans.json").read_text())
        edited["network"] = network
        edited["fusion"] = {**fusion, "method": "weighted_mean", "classifier_weight": 0.5, "networks_kept": True}
        (folder / "plans.json").write_text(json.dumps(edited))
    # a fused folder (as the shipped brain models) lends its networks, with the plan they were trained with, to a
    # new fusion
    from scripts.classifier.fusion import check_fusable, networks_plan

    lent = networks_plan(variants["fused"], "brain")
    assert lent["network"] == plan["network"] and lent["classifier"] is None and lent["split"] == plan["split"]
    check_fusable(fused, lent, variants["fused"] / "brain")
    maps = {}
    for name, models in variants.items():
        predict(models, Path(normal_scans["brain"]), tmp_path / f"out_{name}", "pixel")
        maps[name] = np.asanyarray(nib.load(sorted((tmp_path / f"out_{name}").glob("*.nii.gz"))[0]).dataobj)
    np.testing.assert_allclose(maps["fused"], (maps["classifier_alone"] + maps["networks"]) / 2, atol=2e-3)
    assert np.abs(maps["classifier_alone"] - maps["networks"]).max() > 0.05  # the kinds differ: the mean says something


@pytest.mark.parametrize("best, score, winner", [("weighted_mean_0", 0.3, "weighted_mean_0"),
                                                 ("weighted_mean_0.25", 0.3, "weighted_mean_0.25"),
                                                 ("weighted_mean_1", 0.3, "weighted_mean_1"),
                                                 ("max", 0.101, "weighted_mean_1")])
def test_the_folder_holds_what_the_fusion_winner_needs(best, score, winner, tmp_path):
    """Networks alone win: the classifier's model files go and the plan is the networks' (their split); classifier
    alone: no network is copied; a mean: both, and the plan names the network. A best candidate within MIN_GAIN of
    the classifier alone (0.101 against 0.1) leaves the networks out."""
    from conftest import write_models
    from scripts.classifier.fusion import CANDIDATES, candidate_name, networks_plan, record_fusion
    from scripts.plans import default_plan, ensure_plan, load_plan

    networks = write_models(tmp_path / "networks", "brain", range(5), spatial_size=[32, 32, 32])
    networks_file = networks / "brain" / "plans.json"
    split = {"model_folds": [{"fold": k, "train_tasks": [f"task_{k}"]} for k in range(5)]}
    networks_file.write_text(json.dumps({**json.loads(networks_file.read_text()), "split": split}))
    folder = tmp_path / "run" / "brain"
    plan = {**default_plan("brain", spatial_size=[32, 32, 32]), "network": None,
            "classifier": {"features": {"version": 1}, "files": {"classifier_0.txt": "0" * 64}}}
    ensure_plan(folder, plan)
    (folder / "classifier_0.txt").write_text("trees")
    scores = {candidate_name(m, w): 0.1 for m, w in CANDIDATES}
    fusion = record_fusion(folder, [{"fusion_validation": {**scores, best: score}}], networks / "brain")
    recorded = load_plan(folder.parent, "brain")
    copied = sorted(p.name for p in folder.glob("fold_*.pt"))
    assert fusion["validation_pixel_ap"][best] == score and recorded["fusion"] == fusion
    assert candidate_name(fusion["method"], fusion["classifier_weight"]) == winner
    assert copied == ([] if winner == "weighted_mean_1" else [f"fold_{k}.pt" for k in range(5)])
    assert (recorded["network"] is None) == (winner == "weighted_mean_1")
    assert (folder / "classifier_0.txt").is_file() == (winner != "weighted_mean_0")
    assert (recorded["classifier"] is None) == (winner == "weighted_mean_0")
    if winner == "weighted_mean_0":
        assert recorded["split"] == load_plan(networks, "brain")["split"]
    if winner != "weighted_mean_1":  # a folder that kept the networks lends them to another fusion
        assert networks_plan(folder.parent, "brain")["network"] == load_plan(networks, "brain")["network"]


@pytest.mark.parametrize("dataset, expected", [("brain", "bundle/models"), ("abdom", None)])
def test_the_shipped_recipe_fuses_the_brain_with_the_shipped_networks_and_not_the_abdomen(dataset, expected):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([*CONFIGS[:2], str(ROOT / "bundle/configs" / f"{dataset}.yaml"), CONFIGS[3]])
    parser["bundle_root"] = "bundle"
    assert parser.get_parsed_content("classifier_fuse_with") == expected


def test_the_study_reads_a_trained_variant(trained):
    """bench/study_classifier.py's summary of a run: the fold means of the validation the defaults are chosen on."""
    sys.path.insert(0, str(ROOT / "bench"))
    import study_classifier

    summary = study_classifier.summarise(trained.parent, "brain")
    folds = [json.loads(p.read_text()) for p in sorted((trained / "brain").glob("fold_*.json"))]
    assert summary["folds"] == 5
    assert summary["pixel_ap"] == pytest.approx(np.mean([f["pixel_ap"] for f in folds]))
    assert [f["val_tasks"] for f in summary["per_fold"]] == [f["val_tasks"] for f in folds]
    task = folds[0]["val_tasks"][0]
    held_out = [f["per_task_pixel_ap"][task] for f in folds if task in f["val_tasks"]]
    assert summary["held_out_task_pixel_ap"][task] == pytest.approx(np.mean(held_out))
    table = study_classifier.table({"variants": {"default": {"arguments": "", **summary, "run_seconds": 12.0}}})
    assert "| default | `(defaults)` |" in table and f"{summary['pixel_ap']:.3f}" in table
