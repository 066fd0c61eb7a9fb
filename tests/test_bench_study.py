"""The recipe study (bench/study_recipe.py) at a tiny size: each setting trains through the bundle's training
command under its time budget, records what it was given, and is checked through the MOOD run scripts on one
fold (no quality threshold here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import study_recipe  # noqa: E402


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    work = tmp_path_factory.mktemp("study")
    args = ["--datasets", "brain", "--budget", "0.05", "--size", "32", "--train", "6",
            "--work_dir", str(work), "--json", str(work / "study.json")]
    result = study_recipe.main([*args, "--settings", "baseline", "anomalies_1"])
    return work, args, result


def test_each_setting_trains_under_the_budget_with_its_one_knob(study):
    work, _, result = study
    assert result["settings"]["budget"] == 0.05 and result["settings"]["size"] == 32
    brain = result["datasets"]["brain"]
    for setting, max_anomalies in (("baseline", 4), ("anomalies_1", 1)):
        fold = brain[setting]["record"]["fold"]
        assert fold["recipe"]["max_anomalies"] == max_anomalies and fold["recipe"]["time_budget"] == 0.05
        assert fold["training"]["stopped_by"] == "time_budget"
        best = brain[setting]["record"]["best"]
        assert best["epoch"] == fold["best_metric_epoch"] and best["pixel_ap"] == pytest.approx(fold["best_metric"])
        assert 0 < best["start_pixel_ap"] < 1
        # the check ran the MOOD run scripts on the one trained fold (MOOD_ALLOW_PARTIAL_ENSEMBLE=1)
        check = brain[setting]["check"]
        assert set(check) == {"bundle_mood", "mood_example", "zscore"}
        assert 0 < check["bundle_mood"]["gorilla"]["pixel_ap"] <= 1
        assert (work / "32cubed_0.05min" / "check" / "brain" / setting / "predictions/brain/mood").is_dir()
    assert json.loads((work / "study.json").read_text()) == json.loads(json.dumps(result))


def test_a_study_resumes_without_training_again_and_prints_its_table(study, capsys):
    work, args, result = study
    record = work / "32cubed_0.05min" / "brain" / "baseline" / "models" / "brain" / "fold_0.pt"
    before = record.stat().st_mtime_ns
    again = study_recipe.main([*args, "--settings", "baseline", "--no_check"])
    assert record.stat().st_mtime_ns == before
    assert again["datasets"]["brain"]["baseline"]["record"] == result["datasets"]["brain"]["baseline"]["record"]
    study_recipe.main(["--from_json", str(work / "study.json")])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| brain |")]
    assert [row.split("|")[2].strip() for row in rows[-2:]] == ["baseline", "anomalies_1"]


def test_the_patch_setting_trains_on_the_data_grid_in_crops_of_the_study_size():
    assert study_recipe.setting_arguments("patches", 64, 128) == [
        "--spatial_size", "[128, 128, 128]", "--patch_size", "[64, 64, 64]"]
    assert study_recipe.setting_arguments("patches_windows", 64, 128)[-2:] == ["--sliding_window", "True"]
    assert study_recipe.setting_arguments("mse", 64, 128) == ["--loss", "mse"]
