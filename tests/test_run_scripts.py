"""The four MOOD run scripts from a checkout, under the challenge's constraints: absolute paths,
predictions named after the inputs, nothing written outside the output folder."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["run_pixel_brain.sh", "run_sample_brain.sh", "run_pixel_abdom.sh", "run_sample_abdom.sh"]


def git_status() -> str:
    """Changed and untracked files anywhere, and ignored ones (caches, __pycache__) where a run script could leave
    them: the scripts' and the bundle's folders (other tests running alongside may add ignored outputs elsewhere)."""
    def status(*args: str) -> str:
        return subprocess.run(["git", "status", "--porcelain", *args], cwd=ROOT, capture_output=True, text=True).stdout

    return status() + status("--ignored", "--", "docker", "bundle")


@pytest.mark.parametrize("script", SCRIPTS)
def test_run_script_writes_only_predictions_into_the_output_folder(script, normal_scans, default_models, tmp_path):
    mode, dataset = script[len("run_"):-len(".sh")].split("_")
    inputs = tmp_path / "mnt data"  # a space in the path, and a relative path given to the script
    shutil.copytree(normal_scans[dataset], inputs)
    outputs = tmp_path / "pred"
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir(), tmp.mkdir()
    before = git_status()
    env = dict(os.environ, MOOD_MODELS_DIR=str(default_models), HOME=str(home), TMPDIR=str(tmp))
    env.pop("PYTHONPATH", None)
    result = subprocess.run(["sh", str(ROOT / "docker" / script), "mnt data", "pred"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    names = sorted(p.name for p in inputs.iterdir())
    expected = names if mode == "pixel" else [f"{n}.txt" for n in names]
    assert sorted(p.name for p in outputs.iterdir()) == expected  # nothing else, no temporary folder left
    for name in names:
        if mode == "pixel":
            source, written = nib.load(inputs / name), nib.load(outputs / name)
            assert written.shape == source.shape and np.allclose(written.affine, source.affine)
            values = np.asanyarray(written.dataobj)
            assert 0 <= values.min() and values.max() <= 1
        else:
            assert 0 <= float((outputs / f"{name}.txt").read_text()) <= 1
    assert not any(home.iterdir()) and not any(tmp.iterdir())
    assert git_status() == before  # the checkout stays clean: no caches, no __pycache__
    assert f"summary: {len(names)} done, 0 failed" in result.stdout


def test_run_script_usage_and_missing_input(tmp_path):
    script = str(ROOT / "docker" / "run_pixel_brain.sh")
    result = subprocess.run(["sh", script, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "usage: run_pixel_brain.sh input_folder output_folder" in result.stderr
    result = subprocess.run(["sh", script, str(tmp_path / "missing"), str(tmp_path / "out")], capture_output=True,
                            text=True)
    assert result.returncode != 0 and "does not exist" in result.stderr


def test_mood_layout_scripts_then_evaluation(normal_scans, default_models, tmp_path):
    """The challenge's chain on a MOOD-layout folder: toy/ scans with toy_label/ -> run scripts -> evaluate."""
    from scripts.evaluate import evaluate

    root = tmp_path / "brain"
    (root / "toy").mkdir(parents=True)
    (root / "toy_label" / "pixel").mkdir(parents=True)
    (root / "toy_label" / "sample").mkdir(parents=True)
    for i, scan in enumerate(sorted(normal_scans["brain"].glob("*.nii.gz"))[:4]):
        image = nib.load(scan)
        volume = np.asanyarray(image.dataobj).astype(np.float32)
        mask = np.zeros(volume.shape, dtype=np.uint8)
        if i % 2:  # a bright cube: an anomaly with its label
            mask[12:20, 12:20, 12:20] = 1
            volume[mask > 0] = volume.max() * 1.5
        name = f"toy_{i}.nii.gz"
        nib.save(nib.Nifti1Image(volume, image.affine), root / "toy" / name)
        nib.save(nib.Nifti1Image(mask, image.affine), root / "toy_label" / "pixel" / name)
        (root / "toy_label" / "sample" / f"{name}.txt").write_text(f"{i % 2}\n")
    env = dict(os.environ, MOOD_MODELS_DIR=str(default_models))
    for mode in ("pixel", "sample"):
        out = tmp_path / f"pred_{mode}"
        result = subprocess.run(["sh", str(ROOT / "docker" / f"run_{mode}_brain.sh"), str(root / "toy"), str(out)],
                                env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        report = evaluate(root, out, mode)
        assert report["n_cases"] == 4 and not report["missing"] and not report["failed"]
        assert 0.0 < report["average_precision"] <= 1.0


def test_run_scripts_exit_code_says_whether_every_scan_has_its_output(normal_scans, default_models, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = sorted(normal_scans["brain"].glob("*.nii.gz"))[0]
    shutil.copy(good, inputs / good.name)
    (inputs / "corrupt.nii.gz").write_bytes(b"not a NIfTI file")
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    env = dict(os.environ, MOOD_MODELS_DIR=str(default_models))
    env.pop("PYTHONPATH", None)

    def run(script: str, output: Path) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", str(ROOT / "docker" / script), str(inputs), str(output)], env=env,
                              capture_output=True, text=True, timeout=600)

    sample = run("run_sample_brain.sh", tmp_path / "sample")  # the corrupt scan gets the fallback score
    assert sample.returncode == 0 and "every scan has its output" in sample.stderr, sample.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "sample").iterdir()) == sorted(["corrupt.nii.gz.txt", f"{good.name}.txt"])
    pixel = run("run_pixel_brain.sh", tmp_path / "pixel")  # the corrupt scan has no map
    assert pixel.returncode == 3 and "1 scans have no output" in pixel.stderr, pixel.stderr[-3000:]
    assert [p.name for p in (tmp_path / "pixel").iterdir()] == [good.name]
    same = run("run_pixel_brain.sh", inputs)
    assert same.returncode != 0 and "the output folder is the input folder" in same.stderr
    # the scripts' body for both tasks in one pass: the score files of the sample script and the map of the pixel one
    both = subprocess.run(["bash", str(ROOT / "docker" / "run_mood.sh"), "both", "brain", str(inputs),
                           str(tmp_path / "both")], env=env, capture_output=True, text=True, timeout=600)
    assert both.returncode == 3 and "1 scans have no output" in both.stderr, both.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == sorted(
        [good.name, f"{good.name}.txt", "corrupt.nii.gz.txt"])
    for name in (f"{good.name}.txt", "corrupt.nii.gz.txt"):
        assert (tmp_path / "both" / name).read_text() == (tmp_path / "sample" / name).read_text()
    assert np.array_equal(np.asanyarray(nib.load(tmp_path / "both" / good.name).dataobj),
                          np.asanyarray(nib.load(tmp_path / "pixel" / good.name).dataobj))
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before
