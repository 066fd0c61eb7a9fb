"""The Predictor and its plain command: ``python -m scripts.predict`` writes exactly what the MOOD run scripts write,
and :meth:`Predictor.predict_case` gives the same score and map as the folder run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from scripts.inference.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]


def environment(models: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "bundle")}
    if models is not None:
        env["MOOD_MODELS_DIR"] = str(models)
    return env


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def cases(normal_scans, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cases") / "in"
    folder.mkdir()
    for scan in sorted(Path(normal_scans["brain"]).glob("*.nii.gz"))[:2]:
        (folder / scan.name).symlink_to(scan)
    return folder


def test_predict_both_writes_exactly_what_the_pixel_and_sample_scripts_write(cases, default_models, tmp_path):
    both = tmp_path / "both"
    result = subprocess.run([sys.executable, "-m", "scripts.predict", "-i", str(cases), "-o", str(both), "-d", "brain",
                             "-m", str(default_models), "--mode", "both"], env=environment(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    written = {}
    for mode in ("pixel", "sample"):
        out = tmp_path / mode
        run = subprocess.run(["sh", str(ROOT / "docker" / f"run_{mode}_brain.sh"), str(cases), str(out)],
                             env=environment(default_models), capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        written.update(files(out))
    names = sorted(p.name for p in cases.iterdir())
    assert sorted(written) == sorted([*names, *(f"{n}.txt" for n in names)])
    assert files(both) == written  # the same files, byte for byte (maps included)


def test_predict_worklist_and_bad_arguments(cases, default_models, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "scripts.predict", "-i", str(cases), "-o", str(out), "-d", "brain",
                             "-m", str(default_models), "--mode", "sample", "--worklist"], env=environment(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "scores.csv").is_file() and len((out / "scores.csv").read_text().splitlines()) == 3
    missing = subprocess.run([sys.executable, "-m", "scripts.predict", "-i", str(tmp_path / "nowhere"), "-o",
                              str(out), "-d", "brain", "-m", str(default_models)], env=environment(),
                             capture_output=True, text=True, timeout=600)
    assert missing.returncode not in (0, 3)
    assert "nowhere" in missing.stderr and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    unknown = subprocess.run([sys.executable, "-m", "scripts.predict", "-i", str(cases), "-o", str(out), "-d", "liver"],
                             env=environment(), capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "invalid choice: 'liver'" in unknown.stderr


def test_predict_case_gives_the_folder_runs_score_and_map(cases, default_models, tmp_path):
    out = tmp_path / "out"
    predictor = Predictor.from_bundle("brain", default_models, output_dir=str(out), mode="both", worklist="")
    scan = sorted(cases.iterdir())[0]
    case = predictor.predict_case(scan)
    assert case["error"] == ""
    folder = tmp_path / "folder"
    Predictor.from_bundle("brain", default_models, output_dir=str(folder), mode="both",
                          worklist="").predict_folder(cases)
    assert (folder / f"{scan.name}.txt").read_text() == (out / f"{scan.name}.txt").read_text()
    assert float((folder / f"{scan.name}.txt").read_text()) == pytest.approx(case["score"], abs=1e-6)
    stored = np.asanyarray(nib.load(folder / scan.name).dataobj)
    assert tuple(case["pred"].shape[1:]) == nib.load(scan).shape == stored.shape
    np.testing.assert_allclose(stored, torch.as_tensor(case["pred"])[0].half().float().numpy(), atol=0)


def test_predict_case_of_an_unreadable_scan_is_a_failed_case_with_the_fallback_score(default_models, tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a scan")
    out = tmp_path / "out"
    case = Predictor.from_bundle("brain", default_models, output_dir=str(out), mode="both",
                                 worklist="").predict_case(bad)
    assert "bad.nii.gz" == case["name"] and case["error"]
    assert (out / "bad.nii.gz.txt").read_text().strip() == "1.000000" and not (out / "bad.nii.gz").exists()
    image = tmp_path / "a.png"  # a 2D image or a DICOM series is an item of Predictor.inputs, not a bare path
    image.write_bytes(b"")
    with pytest.raises(ValueError, match="a.png.*must be a NIfTI file"):
        Predictor.from_bundle("brain", default_models, output_dir=str(out), mode="both").predict_case(image)
    assert not (out / "a.png.txt").exists()
