"""Training through the bundle CLI on tiny volumes: brain and abdomen overlays, outputs, determinism,
all folds of a split, and a 2-process DDP run (gloo on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.networks.nets import DynUNet

from scripts.io.files import bundle_configs

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--spatial_size", "[24,24,24]", "--network_depth", "3", "--network_base_filters", "4",
        "--num_workers", "0", "--max_val_samples", "8", "--batch_size", "2"]


def configs(dataset: str, *extra: str) -> str:
    return repr(bundle_configs("bundle", "train", dataset, *extra))


def run(args: list[str], launcher: list[str] | None = None, **env_vars: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bundle"), **env_vars)
    command = (launcher or [sys.executable, "-m"]) + ["monai.bundle", "run",
                                                      "--meta_file", "bundle/configs/metadata.json",
                                                      "--bundle_root", "bundle", *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def tiny_network() -> DynUNet:
    return DynUNet(3, 1, 1, kernel_size=[[3, 3, 3]] * 3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                   upsample_kernel_size=[[2, 2, 2]] * 2, filters=[4, 8, 16], norm_name="instance")


def test_brain_training_writes_checkpoint_metrics_and_logs(normal_scans, tmp_path):
    shipped = sorted((ROOT / "bundle" / "models").rglob("*"))
    out = tmp_path / "run"
    result = run(["--config_file", configs("brain"), "--dataset_dir", str(normal_scans["brain"]),
                  "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"),
                  "--fold", "0", "--num_train_tasks", "1", "--max_epochs", "2", *TINY])
    assert "'poisson_inter' is off" in result.stdout + result.stderr
    checkpoint = out / "models" / "brain" / "fold_0.pt"
    state = torch.load(checkpoint, weights_only=True)
    tiny_network().load_state_dict(state)  # a plain state dict of the configured network
    records = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for record in records:
        assert {"pixel_ap", "sample_ap", "loss", "epoch"} <= set(record) and record["fold"] == 0
        assert 0 <= record["pixel_ap"] <= 1 and 0 <= record["sample_ap"] <= 1 and record["loss"] > 0
    fold = json.loads((out / "models" / "brain" / "fold_0.json").read_text())
    assert fold["train_tasks"] == ["poisson_intra"] and len(fold["val_tasks"]) == 4
    assert fold["best_metric"] == max(r["pixel_ap"] for r in records)
    assert list((out / "logs" / "brain" / "fold_0").glob("events.out.tfevents.*"))
    assert not list(out.rglob("*cache*")) and list((tmp_path / "cache").rglob("*.pt"))
    assert sorted((ROOT / "bundle" / "models").rglob("*")) == shipped


def test_the_cache_of_decoded_scans_goes_under_the_run_folder_by_default(tmp_path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(bundle_configs(ROOT / "bundle", "train", "brain"))
    parser.update({"output_dir": str(tmp_path / "run")})
    assert parser.get_parsed_content("cache_dir") == str(tmp_path / "run" / "cache")


def _preprocessed(scans: Path, cache: Path, spatial_size: list[int]):
    from monai.bundle import ConfigParser

    from scripts.training.folds import cached_scans

    parser = ConfigParser()
    parser.read_config(bundle_configs(ROOT / "bundle", "train", "brain"))
    parser.update({"bundle_root": str(ROOT / "bundle"), "plan": {"spatial_size": spatial_size,
                                                                 "foreground_fraction": 0.01}})
    paths = sorted(str(p) for p in scans.iterdir())[:1]
    return cached_scans(paths, parser.get_parsed_content("preprocessing"), cache, scans)


def test_a_cache_made_at_another_working_grid_is_not_read_back(normal_scans, tmp_path):
    """The cache key holds the preprocessing's settings (MONAI's json_hashing alone keys on the transforms' class
    names): a run at another spatial_size sharing the cache folder gets its own volumes; the key is the same in
    another process, so a cache is reused."""
    cache = tmp_path / "cache"
    first = _preprocessed(normal_scans["brain"], cache, [16, 16, 16])
    assert first[0]["image"].shape[1:] == (16, 16, 16)
    second = _preprocessed(normal_scans["brain"], cache, [20, 20, 20])
    assert second[0]["image"].shape[1:] == (20, 20, 20) and second.transform_hash != first.transform_hash
    assert len(list(cache.rglob("*.pt"))) == 2
    code = ("import sys; sys.path[:0] = ['tests']; from pathlib import Path; from test_training import _preprocessed;"
            f"print(_preprocessed(Path({str(normal_scans['brain'])!r}), Path({str(cache)!r}), [16, 16, 16])"
            ".transform_hash)")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bundle"))
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert other.returncode == 0, other.stderr[-3000:]
    assert other.stdout.strip().splitlines()[-1] == first.transform_hash


def test_the_cache_key_tells_settings_apart_and_holds_no_address():
    """Each kind of setting a transform may hold changes the key when it changes: numbers of any type, paths,
    functions (by code, defaults and closure), partials, methods, sets, dict keys, tensors of any dtype; cycles end."""
    import functools
    from pathlib import Path

    import numpy as np

    from scripts.training.folds import preprocessing_hashing

    def scale(factor):
        return lambda x: x * factor

    class Holder:
        def __init__(self, setting):
            self.setting = setting

        def apply(self, x):
            return x

    pairs = [(np.float32(0.5), np.float32(0.25)), (Path("a"), Path("b")), (scale(2), scale(3)),
             (lambda x: x + 1, lambda x: x + 2), (functools.partial(max, 1), functools.partial(max, 2)),
             (Holder(1).apply, Holder(2).apply), ({1, 2}, {1, 3}), ({1: "a"}, {"1": "a"}),
             (torch.zeros(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.bfloat16)),
             (torch.zeros(2), torch.zeros(2, dtype=torch.int32)), (slice(0, 2), slice(0, 3))]
    for first, second in pairs:
        assert preprocessing_hashing([Holder(first)]) != preprocessing_hashing([Holder(second)]), (first, second)
        assert preprocessing_hashing([Holder(first)]) == preprocessing_hashing([Holder(first)])
    cycle = Holder(None)
    cycle.setting = [cycle]
    assert preprocessing_hashing([cycle])
    assert preprocessing_hashing([Holder(object())]) == preprocessing_hashing([Holder(object())])  # no address


def test_same_seed_same_validation_and_training(normal_scans, tmp_path):
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / name
        run(["--config_file", configs("brain"), "--dataset_dir", str(normal_scans["brain"]),
             "--output_dir", str(out), "--cache_dir", str(tmp_path / f"cache_{name}"),
             "--fold", "2", "--max_epochs", "1", *TINY])
        outputs.append(out)
    first, second = (json.loads((o / "metrics.json").read_text()) for o in outputs)
    assert first == second  # the untrained network sees the same validation set, and training is repeatable
    a, b = (torch.load(o / "models" / "brain" / "fold_2.pt", weights_only=True) for o in outputs)
    assert all(torch.allclose(a[k], b[k]) for k in a)


def test_a_time_budget_stops_training_and_still_validates_and_records_the_run(normal_scans, tmp_path):
    out = tmp_path / "run"
    budget_minutes = 0.25
    run(["--config_file", configs("brain"), "--dataset_dir", str(normal_scans["brain"]), "--output_dir", str(out),
         "--cache_dir", str(tmp_path / "cache"), "--fold", "0", "--max_epochs", "1000", "--val_interval", "3",
         "--time_budget", str(budget_minutes), *TINY])
    fold = json.loads((out / "models" / "brain" / "fold_0.json").read_text())
    training = fold["training"]
    assert training["stopped_by"] == "time_budget" and 1 <= training["epochs"] < 1000
    # stopped before an epoch that would not fit: over by at most an epoch of misjudgement and the last validation
    assert training["seconds"] <= budget_minutes * 60 + 3 * training["longest_epoch_seconds"]
    assert fold["recipe"]["time_budget"] == budget_minutes and fold["recipe"]["max_epochs"] == 1000
    epochs = [r["epoch"] for r in json.loads((out / "metrics.json").read_text())]
    assert epochs[0] == 0 and epochs[-1] == training["epochs"]  # the last epoch was validated
    assert (out / "models" / "brain" / "fold_0.pt").is_file()


def test_fine_tuning_starts_each_fold_from_the_given_models(normal_scans, tmp_path):
    data = ["--config_file", configs("brain"), "--dataset_dir", str(normal_scans["brain"]),
            "--cache_dir", str(tmp_path / "cache")]
    common = [*data, *TINY]
    run([*common, "--fold", "1", "--output_dir", str(tmp_path / "first"), "--max_epochs", "2"])
    first = json.loads((tmp_path / "first" / "metrics.json").read_text())
    best = json.loads((tmp_path / "first" / "models" / "brain" / "fold_1.json").read_text())["best_metric_epoch"]
    init = ["--init_models_dir", str(tmp_path / "first" / "models"), "--max_epochs", "1"]
    run([*common, "--fold", "1", "--output_dir", str(tmp_path / "tuned"), *init])
    tuned = json.loads((tmp_path / "tuned" / "metrics.json").read_text())
    # before any step, the validation sees the first run's best checkpoint: its metrics exactly
    start = {k: tuned[0][k] for k in ("pixel_ap", "sample_ap", "loss")}
    assert start == {k: [r for r in first if r["epoch"] == best][0][k] for k in start}
    fold = json.loads((tmp_path / "tuned" / "models" / "brain" / "fold_1.json").read_text())
    assert fold["recipe"]["init_models_dir"] == str(tmp_path / "first" / "models")
    # a network that does not fit, or a fold without a checkpoint: one line naming the file
    wider = [("8" if previous == "--network_base_filters" else a) for previous, a in zip(["", *TINY], TINY)]
    for name, args, message in (("wider", [*data, *wider, "--fold", "1"], "fold_1.pt' does not fit the network"),
                                ("missing", [*common, "--fold", "2"], "fold_2.pt does not exist")):
        env = dict(os.environ, PYTHONPATH=str(ROOT / "bundle"))
        result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--meta_file",
                                 "bundle/configs/metadata.json", "--bundle_root", "bundle", *args, *init,
                                 "--output_dir", str(tmp_path / name)],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr


def test_training_on_patches_sees_whole_scans_in_one_pass_or_in_sliding_windows(normal_scans, tmp_path):
    import nibabel as nib
    import numpy as np
    from monai.bundle import ConfigParser
    from monai.inferers import SimpleInferer

    out = tmp_path / "run"
    settings = {"dataset_dir": str(normal_scans["brain"]), "output_dir": str(out), "cache_dir": str(tmp_path / "c"),
                "patch_size": [12, 12, 12]}
    run(["--config_file", configs("brain"), *(f"--{k}={v!r}".replace(" ", "") for k, v in settings.items()),
         "--fold", "0", "--max_epochs", "1", *TINY])
    models = out / "models"
    plan = json.loads((models / "brain" / "plans.json").read_text())
    assert plan["patch_size"] == [12, 12, 12] and plan["sliding_window"] is False
    parser = ConfigParser()
    parser.read_config(bundle_configs("bundle", "train", "brain"))
    parser.update({**settings, "spatial_size": [24, 24, 24], "network_depth": 3, "num_workers": 0})
    assert parser.get_parsed_content("train#dataset")[0]["image"].shape == (1, 12, 12, 12)  # training sees crops
    assert parser.get_parsed_content("validate#dataset")[0]["image"].shape == (1, 24, 24, 24)  # validation: scans
    assert isinstance(parser.get_parsed_content("train#inferer").inferer, SimpleInferer)  # in fp32 by default
    assert isinstance(parser.get_parsed_content("validate#inferer"), SimpleInferer)  # in one pass by default
    parser["sliding_window"] = True
    assert list(parser.get_parsed_content("validate#inferer").roi_size) == [12, 12, 12]
    inference = ConfigParser()  # inference reads the patch size and the way to see a scan from the plan
    inference.read_config(bundle_configs("bundle", "inference", "brain"))
    inference.update({"models_dir": str(models)})
    assert isinstance(inference.get_parsed_content("inferer"), SimpleInferer)
    scans = sorted(normal_scans["brain"].glob("*.nii.gz"))
    maps = {}
    for windows in (False, True):  # a user may ask for windows when one pass does not fit the memory
        folder = tmp_path / f"maps_{windows}"
        run(["--config_file", repr(bundle_configs("bundle", "inference", "brain")), "--dataset_dir",
             str(normal_scans["brain"]), "--output_dir", str(folder), "--models_dir", str(models),
             "--allow_partial_ensemble", "True", "--sliding_window", str(windows)])
        maps[windows] = [nib.load(folder / scan.name) for scan in scans]
    for scan, one_pass, windowed in zip(scans, maps[False], maps[True]):
        assert one_pass.shape == windowed.shape == nib.load(scan).shape
        for written in (one_pass, windowed):
            assert 0 <= written.get_fdata().min() <= written.get_fdata().max() <= 1
    assert any(not np.allclose(a.get_fdata(), b.get_fdata()) for a, b in zip(maps[False], maps[True]))


def test_abdomen_with_foreign_brains_and_fingerprint(normal_scans, tmp_path):
    out = tmp_path / "run"
    run(["--config_file", configs("abdom"), "--dataset_dir", str(normal_scans["abdom"]),
         "--foreign_dir", str(normal_scans["brain"]), "--output_dir", str(out),
         "--cache_dir", str(tmp_path / "cache"), "--fold", "3", "--num_train_tasks", "2", "--max_epochs", "3",
         "--val_interval", "2", "--loss", "mse", "--normalisation", "fingerprint", *TINY])
    # validation before training, every second epoch, and after the last epoch
    assert [r["epoch"] for r in json.loads((out / "metrics.json").read_text())] == [0, 2, 3]
    model_dir = out / "models" / "abdom"
    fingerprint = json.loads((model_dir / "plans.json").read_text())["normalisation"]["fingerprint"]
    assert -1000 <= fingerprint["percentile_00_5"] < fingerprint["mean"] < fingerprint["percentile_99_5"] <= 1500
    fold = json.loads((model_dir / "fold_3.json").read_text())
    assert fold["split"]["tasks"] == ["poisson_intra", "poisson_inter", "sink", "source", "smooth_intensity"]
    assert fold["train_tasks"] == ["poisson_intra", "smooth_intensity"]  # combinations(range(5), 2)[3]
    assert fold["split"]["train_data_folds"] == [1, 2, 3]  # the larger group trains
    assert (model_dir / "fold_3.pt").is_file()


def test_all_folds_of_a_split_and_their_summary(normal_scans, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bundle"))
    command = [sys.executable, "-m", "scripts.training", "--config_file", *bundle_configs("bundle", "train", "brain"),
               "--output_dir", str(out), "--num_train_tasks", "4", "--folds", "0", "4",
               "--dataset_dir", str(normal_scans["brain"]), "--cache_dir", str(tmp_path / "cache"),
               "--max_epochs", "1", "--parallel_folds", "2", *TINY]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    # the two folds ran at once and share metrics.json: neither lost a record
    records = json.loads((out / "metrics.json").read_text())
    assert sorted((r["fold"], r["epoch"]) for r in records) == [(0, 0), (0, 1), (4, 0), (4, 1)]
    summary = json.loads((out / "models" / "brain" / "summary.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [0, 4] and summary["failed_folds"] == []
    assert all(f["exit_code"] == 0 and "best_metric" in f for f in summary["folds"])
    assert summary["folds"][1]["train_tasks"] == ["fpi", "sink", "source", "smooth_intensity"]  # (1, 2, 3, 4)
    assert {p.name for p in (out / "models" / "brain").glob("*.pt")} == {"fold_0.pt", "fold_4.pt"}
    assert "no operating points: folds [1, 2, 3] of the plan are not trained yet" in result.stderr
    # the other three folds complete the ensemble: its operating points go into the plan
    command[command.index("--folds") + 1:command.index("--folds") + 3] = ["1", "2", "3"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    recorded = json.loads((out / "models" / "brain" / "plans.json").read_text())["operating_points"]
    assert recorded["normal_scans"] == 10 and set(recorded["folds"]) == {f"fold_{k}.pt" for k in range(5)}
    assert "training scans as normals" in recorded["source"]


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun test needs Linux")
def test_two_process_ddp_on_cpu(normal_scans, tmp_path):
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m"]
    run(["--config_file", configs("brain", "multi_gpu_train.yaml"), "--dataset_dir", str(normal_scans["brain"]),
         "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"), "--fold", "1", "--max_epochs", "2",
         *TINY], launcher=torchrun, CUDA_VISIBLE_DEVICES="")  # CPU and gloo even on a one-GPU machine
    records = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in records] == [0, 1, 2]  # written once, by rank 0
    tiny_network().load_state_dict(torch.load(out / "models" / "brain" / "fold_1.pt", weights_only=True))


def test_the_schedule_follows_the_steps_or_the_budget_whichever_is_further():
    from monai.optimizers import WarmupCosineSchedule

    from scripts.training.handlers import TimeBudget, WarmupCosineWithinBudget

    def rates(make, steps=40):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule, out = make(optimizer), []
        for _ in range(steps):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return out

    monai_rates = rates(lambda o: WarmupCosineSchedule(o, warmup_steps=5, t_total=40))
    ours = rates(lambda o: WarmupCosineWithinBudget(o, warmup_steps=5, t_total=40, budget=TimeBudget(None)))
    assert ours == pytest.approx(monai_rates, abs=1e-9)  # without a budget: MONAI's schedule

    class HalfSpent(TimeBudget):  # the wall clock is half-way through the budget from the start
        def progress(self):
            return 0.5

    half = rates(lambda o: WarmupCosineWithinBudget(o, warmup_steps=5, t_total=40, budget=HalfSpent(1.0)))
    assert half[:5] == pytest.approx(monai_rates[:5])  # warm-up by steps
    assert all(r <= 0.5 + 1e-9 for r in half[5:])  # cos at half-way: 0.5 at most from then on
    assert half[-1] == pytest.approx(monai_rates[-1], abs=1e-9)  # the steps are further along at the end
    with pytest.raises(ValueError, match="positive number of minutes"):
        TimeBudget(0)
