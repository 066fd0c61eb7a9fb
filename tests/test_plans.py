"""The plan of a trained model (models/<dataset>/plans.json): written once by training, refused when it conflicts,
read by inference and the exports without any extra flag; models trained before plans existed get a clear message
and a command that adds one; MONAI's check_properties on both workflows."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import pytest
import torch
from monai.bundle import ConfigWorkflow

from conftest import PLANNED, write_models
from scripts.data.splits import assign_folds, cross_validation_split
from scripts.export import export_dataset
from scripts.io.files import bundle_configs
from scripts.migrate_plans import network_spec_from_state_dict
from scripts.networks import build_network
from scripts.plans import PlanConflictError, default_plan, ensure_plan, load_plan

ROOT = Path(__file__).resolve().parents[1]
META = str(ROOT / "bundle/configs/metadata.json")
TASKS_WITHOUT_FOREIGN = ["poisson_intra", "fpi", "sink", "source", "smooth_intensity"]


def bundle_run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bundle"))
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--meta_file", META, "--bundle_root",
                             "bundle", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_training_writes_one_plan_that_describes_the_model(planned_models, normal_scans):
    folder = planned_models / "models" / "brain"
    plan = load_plan(planned_models / "models", "brain")
    assert plan["spatial_size"] == PLANNED["spatial_size"]
    assert plan["network"]["args"]["filters"] == [16, 32, 64]
    assert plan["normalisation"] == {"mode": "zscore", "fingerprint": None}
    assert plan["sample_score"]["top_fraction"] == 0.01
    assert {"bundle", "monai", "torch", "numpy"} <= set(plan["versions"])
    scans = sorted(p.name for p in normal_scans["brain"].glob("*.nii.gz"))
    assert sorted(plan["split"]["data_folds"]) == scans and len(plan["split"]["model_folds"]) == 5
    assert plan["split"]["model_folds"][0]["train_tasks"] == ["poisson_intra"]
    # the weights are a state dict of exactly the plan's network; no other file restates the setup
    build_network(plan).load_state_dict(torch.load(folder / "fold_0.pt", weights_only=True))
    assert not (folder / "fingerprint.json").exists()
    # no record names the machine that trained it: scans are relative to the dataset folder
    for path in (folder / "plans.json", folder / "fold_0.json", folder / "summary.json"):
        assert str(normal_scans["brain"]) not in path.read_text() and str(planned_models) not in path.read_text()
    fold = json.loads((folder / "fold_0.json").read_text())
    assert sorted(fold["split"]["train_scans"] + fold["split"]["val_scans"]) == scans


def test_inference_and_exports_follow_the_plan_without_any_flag(planned_models, normal_scans, tmp_path):
    inputs = sorted(normal_scans["brain"].glob("*.nii.gz"))[:2]
    folder = tmp_path / "in"
    folder.mkdir()
    for path in inputs:
        shutil.copy(path, folder / path.name)
    models = planned_models / "models"
    configs = repr(bundle_configs("bundle", "inference", "brain"))
    # one of the plan's five folds was trained: a partial ensemble is refused unless asked for
    refused = bundle_run("--config_file", configs, "--dataset_dir", folder, "--output_dir", tmp_path / "refused",
                         "--models_dir", models, check=False)
    assert refused.returncode != 0 and "holds 1 of the 5 fold models its plan trained" in refused.stderr
    assert "fold_1, fold_2, fold_3, fold_4 missing" in refused.stderr and not (tmp_path / "refused").exists()
    for mode in ("pixel", "sample"):
        bundle_run("--config_file", configs, "--dataset_dir", folder, "--output_dir", tmp_path / mode,
                   "--mode", mode, "--models_dir", models, "--allow_partial_ensemble", "True")
    for path in inputs:
        written = nib.load(tmp_path / "pixel" / path.name)
        assert written.shape == nib.load(path).shape
        assert 0 <= float((tmp_path / "sample" / f"{path.name}.txt").read_text()) <= 1
    copy = Path(shutil.copytree(models, tmp_path / "models"))
    record = export_dataset(copy, "brain", formats=["torchscript"], bundle_root=ROOT / "bundle")
    assert record["spatial_size"] == PLANNED["spatial_size"] and record["max_abs_diff"]["torchscript"] < 1e-4


def test_a_fold_refuses_a_models_folder_with_another_plan(planned_models, normal_scans, tmp_path):
    run = Path(shutil.copytree(planned_models, tmp_path / "run", ignore=shutil.ignore_patterns("logs")))
    before = (run / "models/brain/plans.json").read_bytes()
    result = bundle_run("--config_file", repr(bundle_configs("bundle", "train", "brain")),
                        "--dataset_dir", normal_scans["brain"], "--output_dir", run,
                        "--cache_dir", planned_models.parent / "cache", "--fold", "1", "--max_epochs", "1",
                        "--num_workers", "0", "--network_depth", "3", "--network_base_filters", "8",
                        "--spatial_size", "[48,48,48]", check=False)
    log = result.stdout + result.stderr
    assert result.returncode != 0 and "describes another setup" in log and "network" in log
    assert (run / "models/brain/plans.json").read_bytes() == before  # the existing plan is never replaced
    assert not (run / "models/brain/fold_1.pt").exists()


def test_ensure_plan_writes_once_and_compares_afterwards(tmp_path, caplog):
    plan = default_plan("brain", network_depth=3, network_base_filters=4)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(ensure_plan(tmp_path, plan))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(paths) == 8 and json.loads((tmp_path / "plans.json").read_text()) == plan
    assert [p.name for p in tmp_path.iterdir()] == ["plans.json"]  # no temporary file left behind
    newer = {**plan, "versions": {**plan["versions"], "monai": "99.0"}}
    with caplog.at_level(logging.WARNING, logger="scripts.plans"):
        ensure_plan(tmp_path, newer)  # other library versions: the same setup, with a warning
    assert "was made with" in caplog.text
    with pytest.raises(PlanConflictError, match="spatial_size"):
        ensure_plan(tmp_path, {**plan, "spatial_size": [64, 64, 64]})
    abdom = default_plan("abdom", fingerprint={"percentile_00_5": 0.0, "percentile_99_5": 1.0, "mean": 0.5, "std": 1})
    with pytest.raises(PlanConflictError, match="dataset"):
        ensure_plan(tmp_path, abdom)
    shutil.copytree(tmp_path, tmp_path.parent / "other" / "abdom")  # a brain plan in an abdom folder
    with pytest.raises(ValueError, match="is the plan of 'brain' models, not 'abdom'"):
        load_plan(tmp_path.parent / "other", "abdom")


def test_the_patch_size_is_part_of_the_plan_checked_against_grid_and_network(tmp_path):
    plan = default_plan("brain", network_depth=3, spatial_size=[32, 32, 24], patch_size=[16, 16, 8])
    assert plan["patch_size"] == [16, 16, 8] and default_plan("brain")["patch_size"] is None
    with pytest.raises(ValueError, match="none larger"):
        default_plan("brain", network_depth=3, spatial_size=[32, 32, 24], patch_size=[16, 16, 32])
    with pytest.raises(ValueError, match=r"multiple of the network's downsampling \[4, 4, 4\]"):
        default_plan("brain", network_depth=3, spatial_size=[32, 32, 24], patch_size=[16, 16, 10])
    ensure_plan(tmp_path / "brain", plan)
    with pytest.raises(PlanConflictError, match="patch_size"):  # patch and whole-grid folds are no ensemble
        ensure_plan(tmp_path / "brain", {**plan, "patch_size": None})
    # a plan written before patches existed means whole-grid models, and still matches such a run
    older = {k: v for k, v in default_plan("brain", network_depth=3).items() if k != "patch_size"}
    (tmp_path / "old" / "brain").mkdir(parents=True)
    (tmp_path / "old" / "brain" / "plans.json").write_text(json.dumps(older))
    assert load_plan(tmp_path / "old", "brain")["patch_size"] is None
    ensure_plan(tmp_path / "old" / "brain", default_plan("brain", network_depth=3))


@pytest.mark.parametrize("settings", [{}, {"network_depth": 3, "network_base_filters": 16},
                                      {"network_depth": 4, "network_base_filters": 6, "network_max_filters": 24}])
def test_the_network_of_a_state_dict_is_read_back_exactly(settings):
    plan = default_plan("brain", **settings)
    spec = network_spec_from_state_dict(build_network(plan).state_dict())
    assert spec == plan["network"]


def test_old_models_folder_gets_a_clear_message_and_a_plan_from_its_records(tmp_path):
    """A models folder as the bundle wrote it before plans: fold records with the grid, the normalisation and the
    split, a fingerprint.json for CT, no plans.json."""
    models = write_models(tmp_path / "old", "abdom", [0, 1], network_depth=3, network_base_filters=4,
                          spatial_size=[24, 24, 24], normalisation="fingerprint")
    folder = models / "abdom"
    plan = json.loads((folder / "plans.json").read_text())
    (folder / "plans.json").unlink()
    (folder / "fingerprint.json").write_text(json.dumps(plan["normalisation"]["fingerprint"]))
    scans = [f"/data/abdom/{i:05d}.nii.gz" for i in range(10)]
    for fold in (0, 1):
        split = cross_validation_split(scans, fold, tasks=TASKS_WITHOUT_FOREIGN)
        record = {"fold": fold, "spatial_size": [24, 24, 24], "normalisation": "fingerprint",
                  "split": {k: list(v) if isinstance(v, tuple) else v for k, v in split.__dict__.items()}}
        (folder / f"fold_{fold}.json").write_text(json.dumps(record))
    with pytest.raises(FileNotFoundError, match="no plans.json .*python -m scripts.migrate_plans --models_dir"):
        load_plan(models, "abdom")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bundle"))
    subprocess.run([sys.executable, "-m", "scripts.migrate_plans", "--models_dir", str(models), "--dataset", "abdom"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    upgraded = load_plan(models, "abdom")
    for key in ("network", "spatial_size", "normalisation", "sample_score"):
        assert upgraded[key] == plan[key], key
    assert upgraded["split"]["data_folds"] == {Path(s).name: f for s, f in assign_folds(scans).items()}
    assert upgraded["split"]["tasks"][1] == "fpi" and upgraded["split"]["train_tasks"] is None


@pytest.mark.parametrize("dataset", ["brain", "abdom"])
def test_shipped_models_carry_their_plan(dataset):
    """The shipped recipe (bundle/models/README.md): voxel classifiers on both datasets, the brain's fused with the
    GPU-trained networks at the weight its validation chose; every file the plan names loads and matches."""
    from scripts.classifier.model import load_classifier

    plan = load_plan(ROOT / "bundle/models", dataset)
    folder = ROOT / "bundle/models" / dataset
    assert len(plan["split"]["model_folds"]) == 5
    assert len(load_classifier(ROOT / "bundle/models", dataset, plan).folds) == 5  # SHA-256 checked
    folds = sorted(folder.glob("fold_*.pt"))
    if dataset == "brain":
        fusion = plan["fusion"]
        assert fusion["networks_kept"] and 0 < fusion["classifier_weight"] < 1 and len(folds) == 5
        assert [p.name for p in folds] == fusion["networks"]["folds"]
        for path in folds:
            build_network(plan).load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:  # the abdomen's networks normalised with a HU fingerprint: the classifier alone ships
        assert plan["network"] is None and not folds
    assert plan["normalisation"] == {"mode": {"brain": "zscore", "abdom": "robust"}[dataset], "fingerprint": None}
    text = "".join(p.read_text() for p in folder.glob("*.json"))
    assert "/work/" not in text and "/tmp/" not in text and "/home/" not in text
    # measured with these very models, so inference flags scans with them
    from scripts.inference.operating_points import operating_point

    point = operating_point(plan, ROOT / "bundle/models", dataset, 0.05, 0.001)
    assert 0 < point["sample_threshold"] < 1 and 0 < point["voxel_threshold"] < 1


def test_check_properties_of_both_workflows(normal_scans, tmp_path):
    train = ConfigWorkflow(config_file=bundle_configs(ROOT / "bundle", "train", "brain"), meta_file=META,
                           workflow_type="train", bundle_root=str(ROOT / "bundle"),
                           dataset_dir=str(normal_scans["brain"]), output_dir=str(tmp_path / "run"),
                           cache_dir=str(tmp_path / "cache"), spatial_size=[24, 24, 24], network_depth=3,
                           network_base_filters=4, num_workers=0)
    train.initialize()
    assert train.check_properties() == []
    assert isinstance(train.network_def, torch.nn.Module) and train.max_epochs == 100
    models = write_models(tmp_path / "models", "brain", [0], network_depth=3, network_base_filters=4,
                          spatial_size=[24, 24, 24])
    infer = ConfigWorkflow(config_file=bundle_configs(ROOT / "bundle", "inference", "brain"), meta_file=META,
                           workflow_type="infer", bundle_root=str(ROOT / "bundle"),
                           dataset_dir=str(normal_scans["brain"]), output_dir=str(tmp_path / "out"),
                           models_dir=str(models))
    infer.initialize()
    assert infer.check_properties() == []
    assert len(infer.dataset) == len(list(normal_scans["brain"].glob("*.nii.gz")))
    item = infer.dataset[0]
    foreground = item["image"][torch.as_tensor(item["foreground"]).bool()]
    assert abs(float(foreground.mean())) < 1e-3 and abs(float(foreground.std()) - 1) < 1e-2  # as the plan says


def test_training_refuses_too_few_scans_before_any_fold(normal_scans, tmp_path):
    from scripts.training.folds import main

    two = tmp_path / "two"
    two.mkdir()
    for path in sorted(normal_scans["brain"].glob("*.nii.gz"))[:2]:
        shutil.copy(path, two / path.name)
    with pytest.raises(SystemExit, match=r"^training: 2 scans are too few .*\(at least 5 scans\)$"):
        main(["--config_file", *bundle_configs(ROOT / "bundle", "train", "brain"),
              "--output_dir", str(tmp_path / "run"), "--bundle_root", str(ROOT / "bundle"), "--dataset_dir", str(two),
              "--cache_dir", str(tmp_path / "cache"), "--spatial_size", "[24,24,24]"])
    assert not (tmp_path / "run" / "models").exists()  # no plan, no fold started


@pytest.mark.parametrize("value, expected", [
    ("[texture,mirror]", ["texture", "mirror"]), ("['texture', 'mirror']", ["texture", "mirror"]),
    ("{x: 1, y: [b, 2]}", {"x": 1, "y": ["b", 2]}), ("1e-3", 0.001), ("[1,2]", [1, 2]), ("hello world", "hello world"),
    ("$None", "$None"), ("(a,)", ("a",)), ("True", True), ("none", "none"), ("'[a,b]'", "[a,b]")])
def test_the_plan_reads_a_command_line_override_as_the_fold_processes_do(value, expected):
    # the plan is written by training's parent process, the folds by `monai.bundle run` (python-fire): a list of
    # bare words must reach both as the same list, or the plan's feature groups fail while the folds would not
    import fire.parser

    from scripts.training.folds import _parse_overrides

    assert _parse_overrides(["--key", value]) == {"key": expected} == {"key": fire.parser.DefaultParseValue(value)}
