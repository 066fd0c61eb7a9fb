"""The MONAI Deploy application (deploy/app.py) run in its own environment gives exactly the bundle inference's
outputs: the same pixel maps and sample scores, bad scans included, for both datasets and for exported models.

Needs the app's virtual environment (the SDK's pins differ from the main one): `make deploy-test` creates it and
runs this file with MOOD_DEPLOY_PYTHON set; plain `make test` skips it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.export import export_dataset
from scripts.inference.progress import FAILED_CASES_EXIT_CODE
from scripts.io.files import bundle_configs

ROOT = Path(__file__).resolve().parents[1]
DEPLOY_PYTHON = os.environ.get("MOOD_DEPLOY_PYTHON")

pytestmark = pytest.mark.skipif(
    not DEPLOY_PYTHON, reason="needs the MONAI Deploy environment: run `make deploy-test`")


def run_app(input_path: Path, output_dir: Path, models: Path, expected: int | None = 0, **env: str):
    """The app as a subprocess; ``expected``: its exit code (3: some case failed), or None to not check."""
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MOOD_DATASET")}
    environment.update(env)
    result = subprocess.run([DEPLOY_PYTHON, str(ROOT / "deploy/app.py"), "-i", str(input_path), "-o", str(output_dir),
                             "-m", str(models)], cwd=output_dir.parent, env=environment, capture_output=True,
                            text=True, timeout=600)
    if expected is not None:
        assert result.returncode == expected, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def run_bundle(dataset: str, input_dir: Path, output_dir: Path, models_dir: Path, model_format: str, *extra: str):
    """The bundle's inference with ``--mode both``: maps to ``output_dir/pixel``, scores to ``output_dir/sample``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bundle"))
    command = [sys.executable, "-m", "monai.bundle", "run", "--meta_file", "bundle/configs/metadata.json",
               "--bundle_root", "bundle", "--config_file", repr(bundle_configs("bundle", "inference", dataset)),
               "--dataset_dir", str(input_dir), "--output_dir", str(output_dir), "--mode", "both",
               "--pixel_output_dir", str(output_dir / "pixel"), "--sample_output_dir", str(output_dir / "sample"),
               "--models_dir", str(models_dir), "--model_format", model_format,
               "--worklist", str(output_dir / "scores.csv"), *extra]  # beside the compared folders: the app has none
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    # 3: the toy folder's corrupt file failed, every other case was scored
    assert result.returncode in (0, 3), result.stdout[-3000:] + result.stderr[-5000:]


def toy_folder(normal_scans, dataset: str, folder: Path) -> Path:
    """Two tiny scans of ``dataset`` and one corrupt file (the shipped models take about 20 s a scan: CI time)."""
    folder.mkdir(parents=True)
    for path in sorted(normal_scans[dataset].glob("*.nii.gz"))[:2]:
        shutil.copy(path, folder / path.name)
    (folder / "corrupt.nii.gz").write_bytes(b"not a NIfTI file")
    return folder


def assert_same_outputs(app_out: Path, bundle_out: Path) -> None:
    pixel_dir, sample_dir = bundle_out / "pixel", bundle_out / "sample"
    maps = sorted(p.name for p in pixel_dir.iterdir())
    assert sorted(p.name for p in (app_out / "pixel").iterdir()) == maps and len(maps) == 2
    for name in maps:
        expected = np.asanyarray(nib.load(pixel_dir / name).dataobj)
        written = nib.load(app_out / "pixel" / name)
        assert written.get_data_dtype() == np.float32  # the bundle's map survives (the SDK's would cast to uint8)
        np.testing.assert_array_equal(np.asanyarray(written.dataobj), expected)
        assert np.allclose(written.affine, nib.load(pixel_dir / name).affine)
    scores = sorted(p.name for p in sample_dir.iterdir())
    assert sorted(p.name for p in (app_out / "sample").iterdir()) == scores and len(scores) == 3
    for name in scores:
        assert (app_out / "sample" / name).read_text() == (sample_dir / name).read_text()
    assert (sample_dir / "corrupt.nii.gz.txt").read_text().strip() == "1.000000"  # the fallback score


@pytest.mark.parametrize("dataset", ["brain", "abdom"])
def test_app_outputs_equal_bundle_inference_with_the_shipped_models(dataset, normal_scans, tmp_path):
    inputs = toy_folder(normal_scans, dataset, tmp_path / "in")
    models = ROOT / "bundle/models"
    if dataset == "brain":  # the models folder, dataset chosen by MOOD_DATASET
        result = run_app(inputs, tmp_path / "app", models, FAILED_CASES_EXIT_CODE, MOOD_DATASET="brain")
    else:  # one dataset's folder: the dataset is its name
        result = run_app(inputs, tmp_path / "app", models / dataset, FAILED_CASES_EXIT_CODE)
    assert "summary: 2 done, 1 failed" in result.stdout
    run_bundle(dataset, inputs, tmp_path / "bundle", models, "pytorch")
    assert_same_outputs(tmp_path / "app", tmp_path / "bundle")


def test_app_runs_exported_onnx_models_like_the_bundle(normal_scans, default_models, tmp_path):
    models = Path(shutil.copytree(default_models, tmp_path / "models"))
    export_dataset(models, "brain", formats=["onnx"], bundle_root=ROOT / "bundle")
    inputs = toy_folder(normal_scans, "brain", tmp_path / "in")
    run_app(inputs, tmp_path / "app", models / "brain", FAILED_CASES_EXIT_CODE, MOOD_MODEL_FORMAT="onnx")
    run_bundle("brain", inputs, tmp_path / "bundle", models, "onnx")
    assert_same_outputs(tmp_path / "app", tmp_path / "bundle")


def test_app_builds_a_planned_model_of_another_width_and_grid(normal_scans, planned_models, tmp_path):
    """16 base filters at 48^3 (not the defaults): the app builds network and preprocessing from plans.json."""
    models = planned_models / "models"
    inputs = toy_folder(normal_scans, "brain", tmp_path / "in")
    # one fold of the plan's five was trained: both run the partial ensemble only when asked to
    assert run_app(inputs, tmp_path / "refused", models / "brain", expected=None).returncode not in (0, 3)
    run_app(inputs, tmp_path / "app", models / "brain", FAILED_CASES_EXIT_CODE, MOOD_ALLOW_PARTIAL_ENSEMBLE="1")
    run_bundle("brain", inputs, tmp_path / "bundle", models, "pytorch", "--allow_partial_ensemble", "True")
    assert_same_outputs(tmp_path / "app", tmp_path / "bundle")


def test_app_takes_a_single_scan_and_reports_bad_settings_clearly(normal_scans, tmp_path):
    scan = sorted(normal_scans["brain"].glob("*.nii.gz"))[0]
    models = ROOT / "bundle/models"
    run_app(scan, tmp_path / "one", models)
    assert [p.name for p in (tmp_path / "one" / "pixel").iterdir()] == [scan.name]
    assert [p.name for p in (tmp_path / "one" / "sample").iterdir()] == [f"{scan.name}.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_app(empty, tmp_path / "out", models, expected=None)
    assert result.returncode != 0 and "holds no *.nii.gz or *.nii scans" in result.stderr
    result = run_app(scan, tmp_path / "out", models, expected=None, MOOD_DATASET="knee")
    assert result.returncode != 0 and "dataset must be one of" in result.stderr
    result = run_app(scan, tmp_path / "out", models / "abdom", expected=None, MOOD_DATASET="brain")
    assert result.returncode != 0 and "holds 'abdom' models, not 'brain'" in result.stderr


def test_app_runs_a_slice_wise_model_like_the_bundle(normal_scans, tmp_path):
    """A slice-wise (2D) model: the app builds it from its plan as the bundle does, with the same outputs."""
    from conftest import write_models

    models = write_models(tmp_path / "models", "brain", (0, 1), slice_axis=2, spatial_size=[32, 32, 32],
                          network_depth=3, network_base_filters=4)
    inputs = toy_folder(normal_scans, "brain", tmp_path / "in")
    run_app(inputs, tmp_path / "app", models / "brain", FAILED_CASES_EXIT_CODE)
    run_bundle("brain", inputs, tmp_path / "bundle", models, "pytorch")
    assert_same_outputs(tmp_path / "app", tmp_path / "bundle")
