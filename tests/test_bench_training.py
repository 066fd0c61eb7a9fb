"""bench/bench_training.py at a tiny size: every variant (fp32, bf16, channels-last) trains in the same run and is
reported against the first (no speed threshold here: that belongs to the benchmark)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_training  # noqa: E402


def test_variants_are_timed_in_one_run_against_the_first(tmp_path):
    result = bench_training.main(["--spatial_size", "32", "--iterations", "2", "--warmup", "1", "--batch_size", "1",
                                  "--num_workers", "0", "--variants", "fp32", "bf16", "fp32_cl", "--repeats", "2",
                                  "--json", str(tmp_path / "training.json")])
    assert json.loads((tmp_path / "training.json").read_text()) == json.loads(json.dumps(result))
    variants = result["variants"]
    assert list(variants) == ["fp32", "bf16", "fp32_cl"] and variants["fp32"]["speed_vs_first"] == 1.0
    assert variants["bf16"]["precision"] == "bf16" and variants["fp32_cl"]["channels_last"] is True
    for entry in variants.values():
        assert entry["iterations"] == 4 and entry["samples_per_s"] > 0  # 2 timed iterations x 2 repeats
    assert result["samples_per_s"] == variants["fp32"]["samples_per_s"]
