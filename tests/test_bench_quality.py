"""bench/bench_quality.py end to end at a tiny size: held-out toy and gorilla cases in two intensity conventions
through the MOOD run scripts, scored per group next to the baselines (no quality threshold here: thresholds
belong to the benchmark)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from scripts.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_quality  # noqa: E402


@pytest.fixture(scope="module")
def quality(default_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("quality")
    result = bench_quality.main(["--models_dir", str(default_models), "--datasets", "brain", "--size", "32",
                                 "--cases", "4", "--gorilla", "3", "--train", "2", "--work_dir", str(work),
                                 "--json", str(work / "quality.json")])
    return work, result


def test_groups_hold_the_right_cases_and_every_method_is_scored(quality):
    work, result = quality
    assert json.loads((work / "quality.json").read_text()) == json.loads(json.dumps(result))
    cases = json.loads((work / "data/brain/toy_label/anomalies.json").read_text())["cases"]
    normal = [n for n, c in cases.items() if c["label"] == 0]
    methods = result["datasets"]["brain"]["methods"]
    assert set(methods) == {"bundle_mood", "bundle_raw", "mood_example", "zscore"}
    for scored in methods.values():
        assert scored["all"]["n_cases"] == 7 and scored["toy"]["n_cases"] == 4
        assert scored["gorilla"] == {**scored["gorilla"], "n_cases": len(normal) + 3, "n_anomalous": 3}
        for kind in ("noise_cube", "bright_cube", "mirrored_block"):
            assert scored[kind]["n_anomalous"] == 1 and 0 < scored[kind]["pixel_ap"] <= 1
        assert 0 <= scored["toy"]["sample_ap"] <= 1
    assert sorted(c["kinds"][0] for n, c in cases.items() if n.startswith("gorilla_")) == [
        "bright_cube", "mirrored_block", "noise_cube"]


def test_pooled_pixel_ap_is_the_mood_evaluators(quality):
    work, result = quality
    for convention in ("mood", "raw"):
        official = evaluate(work / "data/brain", work / "predictions/brain" / convention, "pixel")
        ours = result["datasets"]["brain"]["methods"][f"bundle_{convention}"]["all"]["pixel_ap"]
        assert ours == pytest.approx(official["average_precision"], abs=1e-9)


def test_the_brain_scores_do_not_depend_on_the_intensity_convention(quality):
    _, result = quality
    methods = result["datasets"]["brain"]["methods"]
    for group, scored in methods["bundle_mood"].items():
        raw = methods["bundle_raw"][group]
        assert scored["pixel_ap"] == pytest.approx(raw["pixel_ap"], abs=0.01), group
        if scored["sample_ap"] is not None:
            assert scored["sample_ap"] == pytest.approx(raw["sample_ap"], abs=0.01), group


def test_rescoring_an_earlier_run_gives_its_numbers(quality, default_models):
    work, result = quality
    again = bench_quality.main(["--models_dir", str(default_models), "--datasets", "brain", "--work_dir", str(work),
                                "--json", str(work / "again.json"), "--rescore"])
    assert again["datasets"]["brain"]["methods"] == result["datasets"]["brain"]["methods"]


def test_reusing_the_data_scores_the_same_cases_again(quality, default_models):
    """``--reuse_data`` runs the models again on the cases an earlier run with the same settings generated (the
    varied toy cases are not regenerated), and other settings generate new cases."""
    work, result = quality
    case = next((work / "data" / "brain" / "cases_mood").glob("*.nii.gz"))
    before = case.stat().st_mtime_ns
    arguments = ["--models_dir", str(default_models), "--datasets", "brain", "--size", "32", "--cases", "4",
                 "--gorilla", "3", "--train", "2", "--work_dir", str(work), "--json", str(work / "reused.json")]
    again = bench_quality.main([*arguments, "--reuse_data"])
    assert case.stat().st_mtime_ns == before
    assert again["datasets"]["brain"]["methods"] == result["datasets"]["brain"]["methods"]
    assert result["settings"]["variability"] == "cohort"


def test_kind_groups_hold_the_cases_of_that_kind_alone_and_every_normal_case():
    cases = {"toy_0.nii.gz": {"label": 0, "kinds": ["normal"]}, "toy_1.nii.gz": {"label": 1, "kinds": ["tumour"]},
             "toy_2.nii.gz": {"label": 1, "kinds": ["tumour", "spots"]},
             "gorilla_0.nii.gz": {"label": 1, "kinds": ["noise_cube"]}}
    groups = bench_quality.groups(cases)
    assert groups["tumour"] == ["toy_0.nii.gz", "toy_1.nii.gz"] and groups["spots"] == ["toy_0.nii.gz"]
    assert groups["toy"] == ["toy_0.nii.gz", "toy_1.nii.gz", "toy_2.nii.gz"] and len(groups["all"]) == 4
    assert groups["gorilla"] == groups["noise_cube"] == ["toy_0.nii.gz", "gorilla_0.nii.gz"]


def test_several_models_folders_are_scored_on_the_same_cases(quality, default_models, tmp_path):
    """``--models NAME=DIR ...`` (bench_slicewise.py's comparison): each folder through the run script on the same
    cases; the 3D set scores what the single-folder run scored, and a slice-wise set gets its own methods."""
    from conftest import write_models

    _, single = quality
    slicewise = write_models(tmp_path / "slicewise", "brain", (0, 1), slice_axis=2, spatial_size=[32, 32, 32],
                             network_depth=3, network_base_filters=4)
    result = bench_quality.main(["--models", f"3d={default_models}", f"2d={slicewise}", "--datasets", "brain",
                                 "--size", "32", "--cases", "4", "--gorilla", "3", "--train", "2", "--conventions",
                                 "mood", "--work_dir", str(tmp_path / "work"), "--json", str(tmp_path / "q.json")])
    entry = result["datasets"]["brain"]
    assert set(entry["methods"]) == {"bundle_3d_mood", "bundle_2d_mood", "mood_example", "zscore"}
    assert set(entry["seconds_per_case"]) == {"3d_mood", "2d_mood"}
    assert entry["methods"]["bundle_3d_mood"] == single["datasets"]["brain"]["methods"]["bundle_mood"]
    assert entry["methods"]["bundle_2d_mood"] != entry["methods"]["bundle_3d_mood"]
    assert result["settings"]["models_dir"] == {"3d": str(default_models), "2d": str(slicewise)}
    with pytest.raises(SystemExit):
        bench_quality.main(["--models", "nodir"])
