"""Inference through the bundle CLI: pixel maps on the input grid, sample scores, the fold ensemble,
bad inputs that never stop the rest, and clear errors for an empty folder or missing models."""

from __future__ import annotations

import gzip
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

from conftest import write_models as write_planned_models
from scripts.io.files import bundle_configs

ROOT = Path(__file__).resolve().parents[1]
TINY = {"network_depth": 3, "network_base_filters": 4, "spatial_size": [24, 24, 24]}


def write_models(models_dir: Path, dataset: str, folds, fingerprint: dict | None = None, **settings) -> Path:
    """Fold models as training writes them: plans.json (a tiny network at a 24^3 grid) and fold_<k>.pt."""
    return write_planned_models(models_dir, dataset, folds, fingerprint, **TINY, **settings)


def infer(dataset: str, input_dir, output_dir, mode: str, models_dir, check: bool = True, *extra: str):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bundle"))
    command = [sys.executable, "-m", "monai.bundle", "run", "--meta_file", "bundle/configs/metadata.json",
               "--bundle_root", "bundle", "--config_file", repr(bundle_configs("bundle", "inference", dataset)),
               "--dataset_dir", str(input_dir), "--output_dir", str(output_dir), "--mode", mode,
               "--models_dir", str(models_dir), "--worklist", "", *extra]  # MOOD's files only: see test_calibration
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_pixel_maps_are_on_the_input_grid_and_in_unit_range(normal_scans, tmp_path):
    models = write_models(tmp_path / "models", "brain", [0])
    out = tmp_path / "pixel"
    result = infer("brain", normal_scans["brain"], out, "pixel", models)
    inputs = sorted(normal_scans["brain"].glob("*.nii.gz"))
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in inputs]
    for path in inputs:
        source, written = nib.load(path), nib.load(out / path.name)
        assert written.shape == source.shape and np.allclose(written.affine, source.affine)
        # the default: the map rounded to float16, in a float32 file without scaling
        assert written.get_data_dtype() == np.float32 and written.dataobj.slope == 1 and written.dataobj.inter == 0
        values = np.asanyarray(written.dataobj)
        assert np.array_equal(values, values.astype(np.float16).astype(np.float32))
        assert values.min() >= 0 and values.max() <= 1 and values.std() > 0
    assert f"[{len(inputs)}/{len(inputs)}]" in result.stdout
    assert f"summary: {len(inputs)} done, 0 failed" in result.stdout
    # where the time went, per case, in the order the stages run
    stages = (r"^\[\d+/\d+\] .*: [\d.]+ s( score [\d.]+)? \(load [\d.]+, preprocess [\d.]+, network [\d.]+, "
              r"summarise [\d.]+, inverse [\d.]+, write [\d.]+ s\)(; \d+ s left)?$")
    assert len(re.findall(stages, result.stdout, re.M)) == len(inputs), result.stdout


def test_both_mode_writes_the_pixel_and_sample_outputs_of_one_pass(normal_scans, tmp_path):
    """``--mode both``: the maps of ``--mode pixel`` and the scores of ``--mode sample`` from one pass per case;
    the maps as stored by default are the float32 ones rounded to float16, and as uint16 within half a step."""
    models = write_models(tmp_path / "models", "brain", [0, 1])
    inputs = sorted(normal_scans["brain"].glob("*.nii.gz"))
    infer("brain", normal_scans["brain"], tmp_path / "pixel", "pixel", models, True, "--pixel_map_dtype", "float32")
    infer("brain", normal_scans["brain"], tmp_path / "sample", "sample", models)
    result = infer("brain", normal_scans["brain"], tmp_path / "both", "both", models, True,
                   "--sample_output_dir", str(tmp_path / "both_scores"))
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == [p.name for p in inputs]
    assert sorted(p.name for p in (tmp_path / "both_scores").iterdir()) == [f"{p.name}.txt" for p in inputs]
    assert result.stdout.count(" network ") == len(inputs)  # one pass of the ensemble per case
    for path in inputs:
        score = (tmp_path / "both_scores" / f"{path.name}.txt").read_text()
        assert score == (tmp_path / "sample" / f"{path.name}.txt").read_text()
        assert f"{path.name}: " in result.stdout and f"score {float(score):.4f}" in result.stdout
        float32 = nib.load(tmp_path / "pixel" / path.name)
        assert float32.get_data_dtype() == np.float32
        exact = np.asanyarray(float32.dataobj)
        stored = np.asanyarray(nib.load(tmp_path / "both" / path.name).dataobj)
        assert np.array_equal(stored, exact.astype(np.float16).astype(np.float32))
    # the maps never replace the scans, whichever folder the scores go to
    same = infer("brain", normal_scans["brain"], tmp_path / "elsewhere", "both", models, False,
                 "--pixel_output_dir", str(normal_scans["brain"]))
    assert same.returncode != 0 and "is the input folder" in same.stdout + same.stderr


def test_ensemble_of_two_folds_is_the_mean_of_its_members(normal_scans, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in sorted(normal_scans["brain"].glob("*.nii.gz"))[:2]:
        (inputs / path.name).write_bytes(path.read_bytes())
    maps = {}
    for name, folds in (("a", [0]), ("b", [1]), ("both", [0, 1])):
        models = write_models(tmp_path / f"models_{name}", "brain", folds)
        infer("brain", inputs, tmp_path / name, "pixel", models, True, "--pixel_map_dtype", "float32")
        maps[name] = [np.asanyarray(nib.load(p).dataobj) for p in sorted((tmp_path / name).iterdir())]
    for a, b, both in zip(maps["a"], maps["b"], maps["both"]):
        assert not np.allclose(a, b)
        np.testing.assert_allclose(both, (a + b) / 2, atol=1e-5)


def test_sample_scores_for_abdomen_with_fingerprint(normal_scans, tmp_path):
    fingerprint = {"percentile_00_5": -900.0, "percentile_99_5": 800.0, "mean": -50.0, "std": 300.0}
    models = write_models(tmp_path / "models", "abdom", [0, 3], fingerprint, normalisation="fingerprint")
    out = tmp_path / "sample"
    infer("abdom", normal_scans["abdom"], out, "sample", models)
    inputs = sorted(normal_scans["abdom"].glob("*.nii.gz"))
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.name}.txt" for p in inputs)
    scores = [float((out / f"{p.name}.txt").read_text()) for p in inputs]
    assert all(0 <= s <= 1 for s in scores) and len(set(scores)) > 1
    (models / "abdom" / "plans.json").unlink()  # models trained before plans existed
    result = infer("abdom", normal_scans["abdom"], tmp_path / "again", "sample", models, check=False)
    log = result.stderr + result.stdout
    assert result.returncode != 0 and "no plans.json" in log and "python -m scripts.migrate_plans" in log


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, normal_scans):
    folder = tmp_path_factory.mktemp("bad")
    good = np.asanyarray(nib.load(sorted(normal_scans["brain"].glob("*.nii.gz"))[0]).dataobj).astype(np.float32)
    (folder / "corrupt.nii.gz").write_bytes(gzip.compress(b"not a nifti" * 20))
    (folder / "empty.nii.gz").write_bytes(b"")
    (folder / "notes.txt").write_text("not a scan")
    nib.save(nib.Nifti1Image(good[:, :, 10].copy(), np.eye(4)), folder / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([good] * 3, -1), np.eye(4)), folder / "series.nii.gz")
    broken = good.copy()
    broken[4:7, 4:7, 4:7], broken[9, 9, 9], broken[10, 10, 10] = np.nan, np.inf, -np.inf
    nib.save(nib.Nifti1Image(broken, np.eye(4)), folder / "nan_inf.nii.gz")
    nib.save(nib.Nifti1Image((good * 1000).astype(np.int16), np.eye(4)), folder / "int16.nii.gz")
    nib.save(nib.Nifti1Image(good[:31, :27, :23].copy(), np.diag([0.7, 1.3, 3.0, 1.0])),
             folder / "odd shape with spaces.nii.gz")
    nib.save(nib.Nifti1Image(np.full((20, 20, 20), 7.0, np.float32), np.eye(4)), folder / "constant.nii.gz")
    nib.save(nib.Nifti1Image(good[..., None], np.eye(4)), folder / "trailing_one.nii")
    return folder


READABLE = ["constant.nii.gz", "int16.nii.gz", "nan_inf.nii.gz", "odd shape with spaces.nii.gz", "trailing_one.nii"]
UNREADABLE = ["corrupt.nii.gz", "empty.nii.gz", "flat.nii.gz", "series.nii.gz"]


def test_bad_inputs_pixel(bad_inputs, tmp_path):
    models = write_models(tmp_path / "models", "brain", [0])
    result = infer("brain", bad_inputs, tmp_path / "out", "pixel", models, check=False)
    assert result.returncode == 3, result.stderr[-3000:]  # some cases failed; every other one was scored
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(READABLE)
    for name in READABLE:
        source, written = nib.load(bad_inputs / name), nib.load(tmp_path / "out" / name)
        assert written.shape == source.shape and np.allclose(written.affine, source.affine)
        values = np.asanyarray(written.dataobj)
        assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1
    log = result.stdout + result.stderr
    for name in UNREADABLE:
        assert f"{name}: FAILED: " in result.stdout
    assert "not a 3D volume: shape (36, 36)" in log and "shape (36, 36, 36, 3)" in log
    assert "notes.txt" in log and "not a NIfTI file" in log
    assert f"summary: {len(READABLE)} done, {len(UNREADABLE)} failed" in result.stdout


def test_bad_inputs_sample_get_the_fallback_score(bad_inputs, tmp_path):
    models = write_models(tmp_path / "models", "brain", [0])
    assert infer("brain", bad_inputs, tmp_path / "out", "sample", models, check=False).returncode == 3
    written = {p.name: float(p.read_text()) for p in (tmp_path / "out").iterdir()}
    assert set(written) == {f"{n}.txt" for n in READABLE + UNREADABLE}
    assert all(written[f"{n}.txt"] == 1.0 for n in UNREADABLE)  # the documented fallback
    assert all(0 <= written[f"{n}.txt"] < 1.0 for n in READABLE)


def test_empty_folder_and_missing_models_are_clear_errors(normal_scans, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    models = write_models(tmp_path / "models", "brain", [0])
    result = infer("brain", empty, tmp_path / "out", "pixel", models, check=False)
    assert result.returncode != 0 and "holds no *.nii.gz or *.nii scans" in result.stdout + result.stderr
    result = infer("brain", normal_scans["brain"], tmp_path / "out", "pixel", tmp_path / "nowhere", check=False)
    assert result.returncode != 0 and "no trained models for 'brain'" in result.stdout + result.stderr


# (name, the scan's intensities as a function of the toy scan's): brain in [0, 1]; abdomen in HU
CONVENTIONS = {
    "brain": {"unit": lambda x: x, "scanner": lambda x: x * 1000 + 100, "affine": lambda x: x * 3 + 100},
    "abdom": {"hu": lambda x: x, "unit": lambda x: (x + 1024) / 4095, "affine": lambda x: x * 3 + 100},
}


@pytest.mark.parametrize("dataset", ["brain", "abdom"])
def test_maps_do_not_depend_on_the_intensity_convention(dataset, normal_scans, tmp_path):
    """The same scan in HU, in MOOD's [0, 1] and in x * 3 + 100 gets the same map from the same models, with the
    dataset's default normalisation (brain: z-score; abdomen: per-scan robust clipping + z-score)."""
    models = write_models(tmp_path / "models", dataset, [0, 1])
    plan = json.loads((models / dataset / "plans.json").read_text())
    assert plan["normalisation"]["mode"] == {"brain": "zscore", "abdom": "robust"}[dataset]
    source = nib.load(sorted(normal_scans[dataset].glob("*.nii.gz"))[0])
    volume = np.asanyarray(source.dataobj).astype(np.float64)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, convert in CONVENTIONS[dataset].items():
        nib.save(nib.Nifti1Image(convert(volume).astype(np.float32), source.affine), inputs / f"{name}.nii.gz")
    infer(dataset, inputs, tmp_path / "out", "pixel", models)
    maps = {name: np.asanyarray(nib.load(tmp_path / "out" / f"{name}.nii.gz").dataobj) for name in CONVENTIONS[dataset]}
    reference = maps.pop(next(iter(CONVENTIONS[dataset])))
    assert reference.std() > 0
    for name, other in maps.items():
        np.testing.assert_allclose(other, reference, atol=1e-3, err_msg=name)


def test_test_time_flips_average_each_flipped_map_flipped_back():
    from scripts.inference.ensemble import Ensemble

    class AddRamp(torch.nn.Module):  # adds a ramp along the last axis: equivariant to the flips of the others
        def forward(self, x):
            return x + torch.arange(x.shape[-1], dtype=x.dtype)

    image = torch.randn(1, 1, 4, 5, 6)
    ramp = torch.arange(6, dtype=torch.float32)
    plain, flipped = torch.sigmoid(image + ramp), torch.sigmoid(image + ramp.flip(0))
    assert torch.allclose(Ensemble([AddRamp()])(image), plain)
    assert torch.allclose(Ensemble([AddRamp()], flip_axes=(0,))(image), plain, atol=1e-6)
    assert torch.allclose(Ensemble([AddRamp(), AddRamp()], flip_axes=(0, 2))(image),
                          (2 * plain + flipped) / 3, atol=1e-6)
    with pytest.raises(ValueError, match="spatial axes 0..2"):
        Ensemble([AddRamp()], flip_axes=(3,))(image)
