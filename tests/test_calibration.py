"""Operating points: thresholds at false-positive rates on normal scans, recorded in the plan after training, and
the worklist inference writes with them (scores.csv)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import write_models
from scripts.data.datasets import list_scans
from scripts.data.splits import default_tasks
from scripts.inference.operating_points import DEFAULT_FPRS, VoxelTail, operating_point, score_threshold
from scripts.inference.worklist import WORKLIST_COLUMNS
from scripts.io.files import bundle_configs
from scripts.networks import build_network
from scripts.plans import default_plan, ensure_plan, load_plan, split_record

ROOT = Path(__file__).resolve().parents[1]
TINY = {"network_depth": 3, "network_base_filters": 4, "spatial_size": [24, 24, 24]}


def test_score_threshold_leaves_at_most_the_rate_above_it():
    scores = [0.1 * i for i in range(1, 11)]  # 0.1 .. 1.0
    assert score_threshold(scores, 0.1) == pytest.approx(0.9)   # one of ten above
    assert score_threshold(scores, 0.25) == pytest.approx(0.8)  # two of ten (2.5 allowed)
    assert score_threshold(scores, 0.05) == pytest.approx(1.0)  # none: half a scan cannot be flagged
    rng = np.random.default_rng(0)
    for rate in (0.01, 0.05, 0.3):
        values = rng.random(137)
        t = score_threshold(values, rate)
        assert (values > t).mean() <= rate
        assert (values >= t).mean() > rate  # the smallest such threshold: one step lower flags too many
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        score_threshold(scores, 0.0)


def test_voxel_tail_threshold_matches_the_exact_quantile_to_a_bin():
    values = torch.rand(200_000, generator=torch.Generator().manual_seed(0)) ** 3
    tail = VoxelTail()
    for part in values.split(50_000):  # scan by scan
        tail.add(part)
    assert tail.total == values.numel()
    for rate in (1e-2, 1e-3, 1e-4):
        t = tail.threshold(rate)
        assert (values > t).float().mean() <= rate
        assert (values > t - 2.0 / tail.counts.size).float().mean() > rate


@pytest.fixture(scope="module")
def calibrated_run(normal_scans, tmp_path_factory):
    """A run folder as training leaves it (plan with its split, five folds of random weights) on the ten tiny
    normals, calibrated by training's own step as for models trained earlier (the shipped ones)."""
    from scripts.calibration import calibrate_from_training_data

    run = tmp_path_factory.mktemp("calibrated") / "run"
    scans = list_scans(normal_scans["brain"])
    plan = default_plan("brain", **TINY)
    plan["split"] = split_record(scans, tasks=default_tasks(has_foreign=False))  # as training without foreign_dir
    folder = run / "models" / "brain"
    ensure_plan(folder, plan)
    for fold in range(5):
        torch.manual_seed(fold)
        torch.save(build_network(plan).state_dict(), folder / f"fold_{fold}.pt")
    calibrate_from_training_data(run / "models", "brain", normal_scans["brain"], max_anomalous=6,
                                 overrides={"max_val_samples": 8})
    assert not (run / "cache").exists()  # decoded scans went to a temporary folder, removed
    return run


def test_models_trained_earlier_are_calibrated_with_the_settings_of_their_own_run(normal_scans, tmp_path):
    """The validation samples of a run trained with 4 tasks per fold and 40 validation samples are those of that
    run, not of training's defaults (1 task, 200 samples): the split from the plan, the rest from the fold's recipe."""
    from scripts.calibration import calibrate_from_training_data, training_settings

    folder = tmp_path / "brain"
    plan = default_plan("brain", **TINY)
    plan["split"] = split_record(list_scans(normal_scans["brain"]), num_train_tasks=4)
    ensure_plan(folder, plan)
    assert training_settings(folder) == {"num_train_tasks": 4, "tasks": plan["split"]["tasks"]}
    recipe = {"num_train_tasks": 4, "samples": 120, "max_val_samples": 40, "label_sigma": 0.2, "max_anomalies": 4,
              "seed": 3, "fuse_with": None}
    (folder / "fold_0.json").write_text(json.dumps({"fold": 0, "recipe": recipe}))
    assert training_settings(folder) == {"num_train_tasks": 4, "tasks": plan["split"]["tasks"], "max_val_samples": 40,
                                         "label_sigma": 0.2, "max_anomalies": 4, "seed": 3}
    # a run trained with poisson_inter needs its foreign scans again: one clear line, nothing recorded
    plan["split"] = split_record(list_scans(normal_scans["brain"]), num_train_tasks=4,
                                 tasks=["fpi", "poisson_intra", "poisson_inter", "sink", "source"])
    (folder / "plans.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match="poisson_inter.*--foreign_dir"):
        calibrate_from_training_data(tmp_path, "brain", normal_scans["brain"])
    assert "operating_points" not in json.loads((folder / "plans.json").read_text())


def test_training_records_thresholds_at_the_stated_rates(calibrated_run):
    recorded = load_plan(calibrated_run / "models", "brain")["operating_points"]
    assert recorded["normal_scans"] == 10 and 0 < recorded["anomalous_samples"] <= 6
    normal = recorded["sample"]["normal_scores"]
    assert len(normal) == 10 and normal == sorted(normal)
    thresholds = recorded["sample"]["thresholds"]
    assert sorted(map(float, thresholds)) == sorted(DEFAULT_FPRS)
    for rate, threshold in thresholds.items():
        assert threshold == score_threshold(normal, float(rate))
        assert np.mean(np.asarray(normal) > threshold) <= float(rate)
        assert 0.0 <= recorded["sample"]["sensitivity"][rate] <= 1.0
    voxel = recorded["voxel"]["thresholds"]
    assert voxel["0.0001"] >= voxel["0.001"] >= voxel["0.01"] > 0
    assert recorded["voxel"]["normal_voxels"] > 10 * 24**3 * 0.1  # the normals' foreground voxels
    assert set(recorded["folds"]) == {f"fold_{k}.pt" for k in range(5)}


def infer(input_dir, output_dir, models_dir, *extra: str, check: bool = True):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bundle"))
    command = [sys.executable, "-m", "monai.bundle", "run", "--meta_file", "bundle/configs/metadata.json",
               "--bundle_root", "bundle", "--config_file", repr(bundle_configs("bundle", "inference", "brain")),
               "--dataset_dir", str(input_dir), "--output_dir", str(output_dir), "--models_dir", str(models_dir),
               *extra]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode in (0, 3), result.stdout[-3000:] + result.stderr[-5000:]
    return result


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == WORKLIST_COLUMNS
        return list(reader)


def test_inference_flags_scans_above_the_recorded_threshold(calibrated_run, normal_scans, tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    for scan in sorted(normal_scans["brain"].glob("*.nii.gz"))[:4]:
        (cases / scan.name).symlink_to(scan)
    (cases / "broken.nii.gz").write_bytes(b"not a scan")
    models = calibrated_run / "models"
    out = tmp_path / "out"
    result = infer(cases, out, models, "--mode", "sample", "--flag_fpr", "0.3", "--voxel_fpr", "0.01")
    assert result.returncode == 3  # the broken case failed, the others were scored
    table = rows(out / "scores.csv")
    assert [r["name"] for r in table] == sorted(p.name for p in cases.iterdir())
    recorded = load_plan(models, "brain")["operating_points"]
    threshold = score_threshold(recorded["sample"]["normal_scores"], 0.3)
    for row in table:
        assert float(row["sample_threshold"]) == pytest.approx(threshold, abs=1e-6)
        assert row["flag_fpr"] == "0.3000" and row["voxel_fpr"] == "0.010000"
        assert float(row["voxel_threshold"]) == pytest.approx(recorded["voxel"]["thresholds"]["0.01"], abs=1e-6)
        if row["name"] == "broken.nii.gz":
            assert row["status"] == "failed" and "not a readable NIfTI" in row["reason"]
            assert row["flagged"] == "yes" and row["sample_score"] == "1.000000"  # the fallback: look at it
            continue
        assert row["status"] == "ok" and row["reason"] == ""
        score = float(row["sample_score"])
        assert score == pytest.approx(float((out / f"{row['name']}.txt").read_text()), abs=1e-6)
        assert row["flagged"] == ("yes" if score > threshold else "no")
        # the peak lies inside the scan, in its world coordinates
        image = nib.load(cases / row["name"])
        corners = np.array([[i, j, k, 1] for i in (0, image.shape[0] - 1) for j in (0, image.shape[1] - 1)
                            for k in (0, image.shape[2] - 1)]) @ image.affine.T
        peak = np.array([float(row[f"max_{a}_mm"]) for a in "xyz"])
        assert np.all(peak >= corners[:, :3].min(0) - 1e-3) and np.all(peak <= corners[:, :3].max(0) + 1e-3)
        assert float(row["map_max"]) >= score
        volume = float(row["volume_above_ml"])
        scan_ml = abs(np.linalg.det(image.affine[:3, :3])) * np.prod(image.shape) / 1000
        assert 0 <= volume <= scan_ml + 1e-6
    assert "FLAGGED" in result.stdout or not any(r["flagged"] == "yes" for r in table if r["status"] == "ok")
    assert re.search(r"^\[1/5\] \S+: .*; \d+ s left$", result.stdout, re.M), result.stdout  # the time left


def test_lower_voxel_rate_means_less_volume_and_unknown_rate_is_refused(calibrated_run, normal_scans, tmp_path):
    models = calibrated_run / "models"
    volumes = {}
    for rate in ("0.01", "0.0001"):
        out = tmp_path / rate
        infer(normal_scans["brain"], out, models, "--mode", "sample", "--voxel_fpr", rate)
        volumes[rate] = [float(r["volume_above_ml"]) for r in rows(out / "scores.csv")]
    assert all(a >= b for a, b in zip(volumes["0.01"], volumes["0.0001"]))
    assert sum(volumes["0.01"]) > sum(volumes["0.0001"])
    refused = infer(normal_scans["brain"], tmp_path / "x", models, "--voxel_fpr", "0.02", check=False)
    assert refused.returncode not in (0, 3)
    assert "voxel_fpr 0.02 is not one of the recorded rates" in refused.stdout + refused.stderr


def test_operating_points_of_other_weights_are_not_used(calibrated_run, tmp_path):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(calibrated_run / "models", models)
    plan = load_plan(models, "brain")
    assert operating_point(plan, models, "brain", 0.05, 0.001)["sample_threshold"] is not None
    # maps the measurement did not see: test-time flips, sliding windows the plan does not use
    for changed in ({"test_time_flips": [0]}, {"sliding_window": True}):
        assert operating_point(plan, models, "brain", 0.05, 0.001, **changed)["sample_threshold"] is None
    assert operating_point(plan, models, "brain", 0.05, 0.001, sliding_window=False)["sample_threshold"] is not None
    (models / "brain" / "fold_4.pt").rename(tmp_path / "fold_4.pt")  # a partial ensemble is another ensemble
    assert operating_point(plan, models, "brain", 0.05, 0.001)["sample_threshold"] is None
    (tmp_path / "fold_4.pt").rename(models / "brain" / "fold_4.pt")
    torch.manual_seed(99)
    torch.save(build_network(plan).state_dict(), models / "brain" / "fold_2.pt")  # retrained since
    point = operating_point(plan, models, "brain", 0.05, 0.001)
    assert point["sample_threshold"] is None and point["voxel_threshold"] is None


def test_uncalibrated_models_give_an_unflagged_worklist_and_mood_scripts_write_none(normal_scans, tmp_path):
    models = write_models(tmp_path / "models", "brain", [0], **TINY)
    out = tmp_path / "out"
    result = infer(normal_scans["brain"], out, models, "--mode", "pixel")
    assert "records no operating points" in result.stdout + result.stderr
    table = rows(out / "scores.csv")  # pixel mode: next to the maps
    assert len(table) == 10 and all(r["flagged"] == "" and r["sample_threshold"] == "" for r in table)
    assert all(float(r["sample_score"]) > 0 for r in table)
    plain = tmp_path / "plain"
    infer(normal_scans["brain"], plain, models, "--mode", "sample", "--worklist", "")
    assert sorted(p.name for p in plain.iterdir()) == sorted(f"{p.name}.txt" for p in normal_scans["brain"].iterdir())


def test_the_check_on_the_training_normals_gives_the_stated_rates(calibrated_run, normal_scans):
    from scripts.calibration import check_on_normals

    # inference's preprocessing from the files scores them as training's cached copies: the same rates come back
    checked = check_on_normals(calibrated_run / "models", "brain", normal_scans["brain"])
    assert checked["normal_scans"] == 10
    for rate, result in {**checked["sample"], **checked["voxel"]}.items():
        assert result["fraction_above"] <= float(rate)
    assert checked["voxel"]["0.01"]["fraction_above"] > 0.001


def test_calibration_on_a_teams_normals(calibrated_run, normal_scans, tmp_path):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(calibrated_run / "models", models)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bundle"))
    result = subprocess.run([sys.executable, "-m", "scripts.calibration", "--models_dir", str(models), "--dataset",
                             "brain", "--normals_dir", str(normal_scans["brain"]), "--max_normals", "6"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = json.loads((models / "brain" / "plans.json").read_text())["operating_points"]
    assert recorded["normal_scans"] == 6 and recorded["anomalous_samples"] == 0
    assert recorded["sample"]["sensitivity"] is None and "normal scans of" in recorded["source"]
    bad = subprocess.run([sys.executable, "-m", "scripts.calibration", "--models_dir", str(models), "--dataset",
                          "brain", "--normals_dir", str(tmp_path / "missing")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
