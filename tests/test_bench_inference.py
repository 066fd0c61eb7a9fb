"""bench/bench_inference.py end to end at a tiny size: the previous release's pixel and sample runs against this
checkout's one pass for both, with the stage split, the I/O floor, the map data types and the output check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_inference  # noqa: E402


def has_commit(commit: str) -> bool:
    return subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not has_commit(bench_inference.DEFAULT_REFERENCE), reason="needs the repository's history")
def test_bench_inference_against_the_previous_release(default_models, tmp_path):
    out = tmp_path / "inference.json"
    result = bench_inference.main(["--cases", "2", "--size", "32", "--datasets", "brain",
                                   "--models_dir", str(default_models), "--json", str(out)])
    assert json.loads(out.read_text())["datasets"].keys() == {"brain"}
    brain = result["datasets"]["brain"]
    assert brain["shape"] == [32, 32, 32] and brain["cases"] == 2
    for run in ("reference_pixel", "reference_sample", "both_pytorch"):
        assert brain[run]["cases"] == 2 and brain[run]["peak_memory_gb"] > 0
    # this checkout's progress lines split every case into the stages; the previous release's had none
    assert set(brain["both_pytorch"]["median_stage_seconds"]) == set(bench_inference.STAGES)
    assert brain["reference_pixel"]["median_stage_seconds"] == {}
    assert brain["io_floor_seconds"]["total"] > 0 and brain["both_to_reference_pixel_plus_sample"] > 0
    # the outputs did not change: the same scores, the maps rounded to float16, the same APs
    outputs = brain["outputs"]
    assert outputs["largest_score_change"] <= 1e-5 and outputs["largest_map_change"] <= 2.0**-12
    assert abs(outputs["pixel_ap"]["change"]) < 1e-4 and abs(outputs["sample_ap"]["change"]) < 1e-4
    dtypes = brain["map_dtypes"]
    assert set(dtypes) == {"float16", "uint16", "float32", "nibabel_default", "write_to_nibabel_default"}
    for exact in ("float16", "float32", "nibabel_default"):  # what MOOD's evaluator reads is the same
        assert dtypes[exact]["ap_change"] == 0 and dtypes[exact]["megabytes"] > 0
    assert abs(dtypes["uint16"]["ap_change"]) < 1e-3 and outputs["pixel_ap"]["change"] == 0


@pytest.mark.skipif(not has_commit(bench_inference.DEFAULT_REFERENCE), reason="needs the repository's history")
def test_classifier_models_are_compared_with_the_models_the_reference_shipped(default_models, tmp_path):
    # the reference release reads networks only: by default a folder of voxel classifiers (the shipped one) is
    # compared release against release, each with its own models; networks run the same models in both
    shipped = ROOT / "bundle" / "models"
    assert bench_inference.holds_classifiers(shipped, ["brain", "abdom"])
    assert not bench_inference.holds_classifiers(default_models, ["brain", "abdom"])
    theirs = bench_inference.reference_models(bench_inference.DEFAULT_REFERENCE, tmp_path / "reference")
    assert sorted(p.name for p in (theirs / "brain").glob("fold_*.pt")) == [f"fold_{k}.pt" for k in range(5)]
    assert not bench_inference.holds_classifiers(theirs, ["brain", "abdom"])
