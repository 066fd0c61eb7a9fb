"""bench/bench_slicewise.py at a tiny size: both kinds train on the same normals with the same budget, all folds,
and bench-quality scores both on the same held-out cases through the MOOD run scripts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_slicewise  # noqa: E402


def test_both_kinds_train_at_the_same_budget_and_are_scored_on_the_same_cases(tmp_path):
    result = bench_slicewise.main(
        ["--datasets", "brain", "--budget", "0.05", "--train", "5", "--size", "32", "--max_val_samples", "2",
         "--cases", "4", "--gorilla", "3", "--work_dir", str(tmp_path), "--json", str(tmp_path / "slicewise.json"),
         "--train_args", "--spatial_size [32,32,32] --network_depth 3 --network_base_filters 4 --slices_per_scan 2"])
    assert json.loads((tmp_path / "slicewise.json").read_text()) == json.loads(json.dumps(result))
    training = result["training"]["brain"]
    assert set(training) == {"3d", "2d"}
    for entry in training.values():
        assert len(entry["folds"]) == 5  # every fold of the split
        for fold in entry["folds"]:
            assert fold["training"]["stopped_by"] == "time_budget" and 0 <= fold["best_metric"] <= 1
    plans = {kind: json.loads((Path(entry["models_dir"]) / "brain" / "plans.json").read_text())
             for kind, entry in training.items()}
    assert plans["2d"]["slice_axis"] == 2 and plans["3d"]["slice_axis"] is None
    assert plans["2d"]["split"]["data_folds"] == plans["3d"]["split"]["data_folds"]  # the same normals and folds
    methods = result["quality"]["brain"]["datasets"]["brain"]["methods"]
    assert {"bundle_3d_mood", "bundle_2d_mood"} <= set(methods)
    assert methods["bundle_3d_mood"]["toy"]["n_cases"] == methods["bundle_2d_mood"]["toy"]["n_cases"] == 4
    assert "| brain | 2d |" in bench_slicewise.table(result["training"])
