"""MOOD-style evaluation (scripts.evaluate) against sklearn on float16-clipped predictions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from scripts.evaluate import F16_BINS, auroc_from_counts, evaluate, float16_bin_counts, main

SHAPE = (10, 9, 8)  # not cubic, so an axis mix-up would show
N_CASES = 6
ANOMALOUS = (1, 2, 4)
REPO = Path(__file__).resolve().parents[1]


def _mask(rng: np.random.Generator, anomalous: bool) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    if anomalous:
        corner = [int(rng.integers(0, n - 4)) for n in SHAPE]
        size = [int(rng.integers(2, 5)) for _ in SHAPE]
        mask[tuple(slice(c, c + s) for c, s in zip(corner, size))] = 1
    return mask


def _prediction(rng: np.random.Generator, mask: np.ndarray, case: int) -> np.ndarray:
    """Float32 scores correlated with the mask, with values outside [0, 1], NaN, +-inf, -0.0, subnormals, ties."""
    pred = rng.normal(0.3, 0.35, SHAPE) + 0.4 * mask
    if case % 2:
        pred = np.round(pred, 1)  # heavy ties
    flat = pred.reshape(-1)
    flat[:8] = [np.nan, -0.0, 0.0, np.inf, -np.inf, 1e-7, 6e-5, 70000.0]
    return pred.astype(np.float32)


def _reference(pred: np.ndarray | None, shape=SHAPE) -> np.ndarray:
    """What MOOD scores: float16, clipped, NaN -> 0 (our documented choice); zeros when unusable."""
    if pred is None:
        return np.zeros(int(np.prod(shape)))
    with np.errstate(over="ignore"):
        out = np.clip(pred.astype(np.float16), 0.0, 1.0)
    out[np.isnan(out)] = 0.0
    return out.astype(np.float64).reshape(-1)


def _save(array: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


@pytest.fixture
def mood(tmp_path):
    """A MOOD-layout dataset of N_CASES tiny scans, pixel and sample labels, and predictions for both tasks."""
    rng = np.random.default_rng(0)
    data, pred = tmp_path / "brain", tmp_path / "pred"
    for sub in ("toy", "toy_label/pixel", "toy_label/sample"):
        (data / sub).mkdir(parents=True)
    (pred / "pixel").mkdir(parents=True)
    (pred / "sample").mkdir(parents=True)
    masks, preds, scores = {}, {}, {}
    for case in range(N_CASES):
        name = f"toy_{case}.nii.gz"
        mask = _mask(rng, case in ANOMALOUS)
        _save(rng.normal(size=SHAPE).astype(np.float32), data / "toy" / name)
        # one label stored as float32, the rest as uint8
        _save(mask.astype(np.float32) if case == 2 else mask, data / "toy_label" / "pixel" / name)
        (data / "toy_label" / "sample" / f"{name}.txt").write_text(f"{int(case in ANOMALOUS)}\n")
        masks[name] = mask.astype(bool)
        preds[name] = _prediction(rng, mask, case)
        _save(preds[name], pred / "pixel" / name)
        scores[name] = float(rng.normal(0.5, 0.4)) + 0.3 * (case in ANOMALOUS)
        (pred / "sample" / f"{name}.txt").write_text(f"{scores[name]!r}\n")
    return {"data": data, "pred": pred, "masks": masks, "preds": preds, "scores": scores}


def _pixel_reference(mood, overrides=None):
    overrides = overrides or {}
    labels, scores = [], []
    for name in sorted(mood["masks"]):
        labels.append(mood["masks"][name].reshape(-1))
        scores.append(_reference(overrides.get(name, mood["preds"][name])))
    return np.concatenate(labels), np.concatenate(scores)


@pytest.mark.parametrize("seed", range(3))
def test_auroc_from_counts_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 40, size=3000)
    labels = rng.random(3000) < 0.1 + 0.5 * scores / 40
    got = auroc_from_counts(np.bincount(scores[labels], minlength=40), np.bincount(scores[~labels], minlength=40))
    assert abs(got - roc_auc_score(labels, scores)) < 1e-9


def test_auroc_from_counts_undefined_without_both_classes():
    assert np.isnan(auroc_from_counts(np.zeros(3), np.ones(3)))
    assert np.isnan(auroc_from_counts(np.ones(3), np.zeros(3)))


def test_float16_bins_are_value_ordered_and_merge_negative_zero():
    values = np.array([-0.0, 0.0, 1e-7, 6e-5, 0.25, 0.5, 1.0, 2.0, -3.0, np.nan], dtype=np.float32)
    label = np.ones(values.shape, dtype=bool)
    positives, negatives, nans = float16_bin_counts(values, label)
    assert positives.shape == (F16_BINS,) and negatives.sum() == 0 and nans == 1
    assert positives[0] == 4  # -0.0, 0.0, -3.0 (clipped), NaN
    all_f16 = np.arange(F16_BINS, dtype=np.uint16).view(np.float16).astype(np.float64)
    assert np.all(np.diff(all_f16) > 0) and all_f16[0] == 0.0 and all_f16[-1] == 1.0


@pytest.mark.parametrize("chunk", [None, 100], ids=["whole", "slabs"])
def test_pixel_ap_and_auroc_equal_sklearn(mood, chunk, monkeypatch):
    if chunk is not None:  # one z-slice per step: exercises the slab loop
        monkeypatch.setattr("scripts.evaluate.CHUNK_VOXELS", chunk)
    result = evaluate(mood["data"], mood["pred"] / "pixel", "pixel")
    labels, scores = _pixel_reference(mood)
    assert abs(result["average_precision"] - average_precision_score(labels, scores)) < 1e-9
    assert abs(result["auroc"] - roc_auc_score(labels, scores)) < 1e-9
    assert result["n_cases"] == N_CASES and result["n_positive_cases"] == len(ANOMALOUS)
    assert result["n_positives"] == int(labels.sum()) and result["n_negatives"] == int((~labels).sum())
    assert result["missing"] == [] and result["failed"] == [] and result["label_errors"] == []
    assert result["nan_predictions"] == N_CASES
    for case in result["cases"]:
        mask = mood["masks"][case["case"]].reshape(-1)
        if mask.any():
            ref = _reference(mood["preds"][case["case"]])
            assert abs(case["average_precision"] - average_precision_score(mask, ref)) < 1e-9
            assert abs(case["auroc"] - roc_auc_score(mask, ref)) < 1e-9
        else:
            assert case["average_precision"] is None and case["auroc"] is None


def test_pixel_missing_wrong_shape_and_unreadable_count_as_zeros(mood):
    pixel = mood["pred"] / "pixel"
    (pixel / "toy_1.nii.gz").unlink()
    _save(np.ones((10, 9, 9), dtype=np.float32), pixel / "toy_2.nii.gz")
    (pixel / "toy_3.nii.gz").write_bytes(b"not a nifti at all")
    result = evaluate(mood["data"], pixel, "pixel")
    labels, scores = _pixel_reference(mood, {f"toy_{i}.nii.gz": None for i in (1, 2, 3)})
    assert abs(result["average_precision"] - average_precision_score(labels, scores)) < 1e-9
    assert abs(result["auroc"] - roc_auc_score(labels, scores)) < 1e-9
    assert result["missing"] == ["toy_1.nii.gz"] and result["n_missing"] == 1
    failed = {item["case"]: item["reason"] for item in result["failed"]}
    assert set(failed) == {"toy_2.nii.gz", "toy_3.nii.gz"} and result["n_failed"] == 2
    assert "shape" in failed["toy_2.nii.gz"]
    statuses = {case["case"]: case["status"] for case in result["cases"]}
    assert statuses["toy_1.nii.gz"] == "missing" and statuses["toy_0.nii.gz"] == "ok"


def test_pixel_unreadable_label_skips_case(mood):
    (mood["data"] / "toy_label" / "pixel" / "toy_5.nii.gz").write_bytes(b"garbage")
    result = evaluate(mood["data"], mood["pred"] / "pixel", "pixel")
    masks = dict(mood["masks"])
    del masks["toy_5.nii.gz"]
    labels, scores = _pixel_reference({**mood, "masks": masks})
    assert abs(result["average_precision"] - average_precision_score(labels, scores)) < 1e-9
    assert result["n_cases"] == N_CASES - 1 and [e["case"] for e in result["label_errors"]] == ["toy_5.nii.gz"]


def test_sample_ap_and_auroc_equal_sklearn_with_missing_and_bad_scores(mood):
    sample = mood["pred"] / "sample"
    scores = dict(mood["scores"])
    (sample / "toy_0.nii.gz.txt").unlink()
    scores["toy_0.nii.gz"] = 0.0
    (sample / "toy_3.nii.gz.txt").write_text("nan\n")
    scores["toy_3.nii.gz"] = 0.0
    (sample / "toy_5.nii.gz.txt").write_text("not a number\n")
    scores["toy_5.nii.gz"] = 0.0
    (sample / "toy_1.nii.gz.txt").write_text("3.5\n")
    scores["toy_1.nii.gz"] = 1.0
    (sample / "toy_2.nii.gz.txt").write_text("1.0\n")  # ties with the clipped 3.5
    scores["toy_2.nii.gz"] = 1.0
    result = evaluate(mood["data"], sample, "sample")
    names = sorted(scores)
    labels = np.array([int(name[4]) in ANOMALOUS for name in names])
    ref = np.clip([scores[name] for name in names], 0.0, 1.0)
    assert abs(result["average_precision"] - average_precision_score(labels, ref)) < 1e-9
    assert abs(result["auroc"] - roc_auc_score(labels, ref)) < 1e-9
    assert result["n_cases"] == N_CASES and result["n_positive_cases"] == len(ANOMALOUS)
    assert result["missing"] == ["toy_0.nii.gz.txt"]
    assert [item["case"] for item in result["failed"]] == ["toy_5.nii.gz.txt"]
    assert result["nan_predictions"] == 1


def test_cli_writes_json_and_prints_path_last(mood, tmp_path, capsys):
    output = tmp_path / "out" / "eval.json"
    result = main(["--data_dir", str(mood["data"]), "--pred_dir", str(mood["pred"] / "sample"),
                   "--mode", "sample", "--output", str(output)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(output) and any("average precision" in line for line in lines)
    assert json.loads(output.read_text())["average_precision"] == pytest.approx(result["average_precision"])


def test_cli_module_default_output(mood):
    pixel = mood["pred"] / "pixel"
    env = {**os.environ, "PYTHONPATH": str(REPO / "bundle")}
    proc = subprocess.run([sys.executable, "-m", "scripts.evaluate", "--data_dir", str(mood["data"]),
                           "--pred_dir", str(pixel), "--mode", "pixel"],
                          capture_output=True, text=True, env=env, cwd=REPO, check=True)
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path == pixel / "evaluation_pixel.json"
    report = json.loads(path.read_text())
    labels, scores = _pixel_reference(mood)
    assert abs(report["average_precision"] - average_precision_score(labels, scores)) < 1e-9
    assert report["n_cases"] == N_CASES and len(report["cases"]) == N_CASES
