"""Hostile inputs through the bundle's inference: a failure in any stage of one case (reading, the header's
claims, the writers) never costs another case; outputs are written whole or not at all; a stale output of a case
that now fails is removed; the input folder is never written to."""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import write_models
from scripts.cli import describe_error
from scripts.inference.worklist import read_worklist
from scripts.io import files
from scripts.io.files import bundle_configs, is_scan, write_atomically
from scripts.transforms import NormaliseIntensity
from tools.hostile_inputs import LONG_NAME, claim_header, nan_sform_nii

ROOT = Path(__file__).resolve().parents[1]
TINY = {"network_depth": 3, "network_base_filters": 4, "spatial_size": [24, 24, 24]}


def infer(input_dir: Path, output_dir: Path, mode: str, models: Path,
          worklist: Path | str = "") -> subprocess.CompletedProcess:
    """A bundle inference run; ``worklist``: where scores.csv goes ("" none: the output folder holds MOOD's files)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bundle"))
    command = [sys.executable, "-m", "monai.bundle", "run", "--meta_file", "bundle/configs/metadata.json",
               "--bundle_root", "bundle", "--config_file", repr(bundle_configs("bundle", "inference", "brain")),
               "--dataset_dir", str(input_dir), "--output_dir", str(output_dir), "--mode", mode,
               "--models_dir", str(models), "--worklist", str(worklist)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, normal_scans):
    folder = tmp_path_factory.mktemp("hostile")
    good = sorted(normal_scans["brain"].glob("*.nii.gz"))[0]
    volume = np.asanyarray(nib.load(good).dataobj).astype(np.float32)
    (folder / "good.nii.gz").write_bytes(good.read_bytes())
    (folder / "nan_sform.nii").write_bytes(nan_sform_nii(volume))
    (folder / LONG_NAME).write_bytes(good.read_bytes())
    (folder / "huge_claim.nii.gz").write_bytes(gzip.compress(claim_header((1200, 1200, 1200))))  # 6.9 GB claimed
    truncated = nib.Nifti1Image(volume, np.eye(4)).to_bytes()
    (folder / "truncated.nii").write_bytes(truncated[: len(truncated) // 2])
    # uncompressed despite its name, and at a scale a fixed guard would not normalise
    (folder / "tiny_scale.nii.gz").write_bytes(nib.Nifti1Image(volume * 1e-12, np.eye(4)).to_bytes())
    (folder / "really_gzipped.nii").write_bytes(good.read_bytes())
    (folder / "gone.nii.gz").symlink_to(folder / "nowhere.nii.gz")
    nib.save(nib.Nifti1Image(volume[:, :, 18:19].copy(), np.eye(4)), folder / "slab.nii.gz")  # one slice thick
    return folder


def test_pixel_task_isolates_every_case_and_never_writes_to_the_input(hostile, tmp_path):
    models = write_models(tmp_path / "models", "brain", [0], **TINY)
    before = digest(hostile)
    out = tmp_path / "pixel"
    out.mkdir()
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), out / "truncated.nii")  # an earlier run's
    result = infer(hostile, out, "pixel", models)
    log = result.stdout + result.stderr
    assert result.returncode == 3, log[-4000:]  # some cases failed: the exit code says so
    assert sorted(p.name for p in out.iterdir()) == sorted(["good.nii.gz", "nan_sform.nii", LONG_NAME,
                                                            "tiny_scale.nii.gz", "really_gzipped.nii", "slab.nii.gz"])
    assert nib.load(out / "slab.nii.gz").shape == (36, 36, 1)
    # (no stale map of the truncated case, no partial file)
    assert "gone.nii.gz: FAILED:" in result.stdout and "broken or looping symbolic link" in log
    nan_map = nib.load(out / "nan_sform.nii")
    assert np.isfinite(nan_map.affine).all() and nan_map.shape == (36, 36, 36)
    assert "huge_claim.nii.gz: FAILED: the header claims 1200x1200x1200" in log and "max_scan_voxels" in log
    assert "truncated.nii: FAILED: truncated: the file holds" in log
    tiny = np.asanyarray(nib.load(out / "tiny_scale.nii.gz").dataobj)
    good = np.asanyarray(nib.load(out / "good.nii.gz").dataobj)
    np.testing.assert_allclose(tiny, good, atol=2.0**-11)  # any scale (to a step of the float16 the map is stored in)
    assert digest(hostile) == before


def test_sample_task_survives_a_writer_failure(hostile, tmp_path):
    models = write_models(tmp_path / "models", "brain", [0], **TINY)
    before = digest(hostile)
    result = infer(hostile, tmp_path / "sample", "sample", models, worklist=tmp_path / "scores.csv")
    log = result.stdout + result.stderr
    assert result.returncode == 3, log[-4000:]
    written = {p.name: float(p.read_text()) for p in (tmp_path / "sample").iterdir()}
    # the worklist has a row for every case, the failed ones with their reason, even the one without a score file
    rows = {r["name"]: r for r in read_worklist(tmp_path / "scores.csv")}
    assert set(rows) == {p.name for p in hostile.iterdir() if is_scan(p)}
    failed = {n for n, r in rows.items() if r["status"] == "failed"}
    assert failed == {"huge_claim.nii.gz", "truncated.nii", "gone.nii.gz", LONG_NAME}
    assert all(rows[n]["reason"] for n in failed) and "File name too long" in rows[LONG_NAME]["reason"]
    assert rows["huge_claim.nii.gz"]["sample_score"] == "1.000000" and rows[LONG_NAME]["sample_score"] == ""
    # every case but the one whose score file name is too long has its score; the unreadable ones the fallback
    scored = ("good.nii.gz", "nan_sform.nii", "huge_claim.nii.gz", "truncated.nii", "tiny_scale.nii.gz",
              "really_gzipped.nii", "gone.nii.gz", "slab.nii.gz")
    assert set(written) == {f"{n}.txt" for n in scored}
    assert written["huge_claim.nii.gz.txt"] == written["truncated.nii.txt"] == written["gone.nii.gz.txt"] == 1.0
    assert written["really_gzipped.nii.txt"] == written["good.nii.gz.txt"]
    assert 0 <= written["good.nii.gz.txt"] < 1
    assert f"{LONG_NAME}: FAILED:" in result.stdout and "File name too long" in log
    assert "summary: 5 done, 4 failed" in result.stdout
    assert digest(hostile) == before


def test_output_folder_equal_to_the_input_folder_is_refused(hostile, tmp_path):
    models = write_models(tmp_path / "models", "brain", [0], **TINY)
    before = digest(hostile)
    result = infer(hostile, hostile, "pixel", models)
    assert result.returncode != 0 and "is the input folder" in result.stdout + result.stderr
    assert digest(hostile) == before


def test_write_atomically_leaves_the_old_file_or_the_whole_new_one(tmp_path):
    target = tmp_path / "case.nii.gz"
    target.write_bytes(b"old")

    def interrupted(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise SystemExit(143)  # what SIGTERM becomes (scripts.cli.exit_cleanly_on_sigterm)

    with pytest.raises(SystemExit):
        write_atomically(target, interrupted)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["case.nii.gz"]
    write_atomically(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["case.nii.gz"]


def test_write_atomically_gives_the_file_the_mode_of_any_new_file(tmp_path, monkeypatch):
    # mkstemp's files are private (0600): a map the container's root wrote would be unreadable to its owner
    monkeypatch.setattr(files, "_UMASK", 0o022)
    previous = os.umask(0o022)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        written = write_atomically(tmp_path / "case.nii.gz.txt", lambda tmp: tmp.write_text("0.5"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644


def test_describe_error_names_the_real_cause_and_the_stage():
    try:
        try:
            try:
                raise MemoryError("cannot allocate 7 GB")
            except MemoryError as err:
                raise RuntimeError("applying transform <monai.transforms.io.dictionary.LoadImaged object>") from err
        except RuntimeError as err:
            raise RuntimeError("applying transform <monai.transforms.compose.Compose object>") from err
    except RuntimeError as err:
        assert describe_error(err) == "LoadImaged: MemoryError: cannot allocate 7 GB"
    assert describe_error(ValueError("not a 3D volume: shape (4, 4)")) == "not a 3D volume: shape (4, 4)"


def test_normalisation_works_at_any_scale():
    x = torch.rand(1, 8, 8, 8) * 100
    for scale in (1e-12, 1.0, 1e12):
        out = NormaliseIntensity()(x * scale)
        assert abs(float(out.mean())) < 1e-4 and abs(float(out.std()) - 1) < 1e-4, scale
    assert torch.equal(NormaliseIntensity()(torch.full((1, 4, 4, 4), 7.0)), torch.zeros(1, 4, 4, 4))


def test_a_checkpoint_that_would_run_code_is_refused_without_lowering_the_safety(tmp_path):
    from scripts.inference.ensemble import load_ensemble
    from scripts.networks import build_network
    from scripts.plans import load_plan

    class RunsCode:
        def __reduce__(self):
            return (print, ("this would have run",))

    models = write_models(tmp_path / "models", "brain", [0], **TINY)
    torch.save({"weight": RunsCode()}, models / "brain" / "fold_0.pt")
    network_def = build_network(load_plan(models, "brain"))
    with pytest.raises(ValueError, match="is refused: it is not a plain state dict") as info:
        load_ensemble(network_def, models, "brain", "cpu")
    assert "weights_only=False" not in str(info.value)


def test_check_folds_refuses_a_partial_ensemble_and_names_failed_folds(tmp_path, caplog):
    import json
    import logging

    from scripts.inference.ensemble import check_folds

    folder = tmp_path / "brain"
    folder.mkdir()
    (folder / "fold_0.pt").write_bytes(b"")
    (folder / "summary.json").write_text(json.dumps({"failed_folds": [1]}))
    plan = {"split": {"model_folds": [{"fold": 0}, {"fold": 1}]}}
    with caplog.at_level(logging.WARNING, logger="scripts.inference.ensemble"):
        with pytest.raises(ValueError, match="holds 1 of the 2 fold models its plan trained .fold_1 missing"):
            check_folds([folder / "fold_0.pt"], plan)
        check_folds([folder / "fold_0.pt"], plan, allow_partial=True)
        check_folds([folder / "fold_0.pt"], {"split": None})  # a plan without a split: nothing to compare
    assert "lists failed folds [1]" in caplog.text and "a partial ensemble: fold_1 missing" in caplog.text


def run_script(script: str, inputs: Path, output: Path, models: Path, memory_kb: int = 6_000_000):
    """A MOOD run script as the grader runs it, under a virtual-memory limit (``ulimit -v``)."""
    env = dict(os.environ, MOOD_MODELS_DIR=str(models))
    env.pop("PYTHONPATH", None)
    command = f'ulimit -v {memory_kb}; exec sh "$0" "$1" "$2"'
    return subprocess.Popen(["bash", "-c", command, str(ROOT / "docker" / script), str(inputs), str(output)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("mode", ["pixel", "sample"])
def test_the_hostile_corpus_through_the_run_scripts_under_a_memory_limit(mode, tmp_path, default_models):
    from tools.hostile_inputs import write_hostile_corpus

    corpus = write_hostile_corpus(tmp_path / "in")
    before, around = digest(tmp_path / "in"), sorted(p.name for p in tmp_path.iterdir())
    child = run_script(f"run_{mode}_brain.sh", tmp_path / "in", tmp_path / "out", default_models)
    stdout, stderr = child.communicate(timeout=600)
    scored = sorted(n for n, c in corpus.items() if c["outcome"] == "scored"
                    or (n == LONG_NAME and mode == "pixel"))
    failed = sorted(n for n, c in corpus.items() if c["outcome"] == "failed" or n == LONG_NAME) \
        if mode == "sample" else sorted(n for n, c in corpus.items() if c["outcome"] == "failed")
    assert child.returncode == 3, stderr[-3000:]  # some scans have no output (pixel: unreadable; sample: the long name)
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    if mode == "pixel":
        assert written == scored  # every readable case scored, nothing else written
        maps = {name: np.asanyarray(nib.load(tmp_path / "out" / name).dataobj) for name in scored}
        assert all(np.isfinite(m).all() for m in maps.values())
        for name in ("tiny_scale.nii.gz", "huge_scale.nii", "tiny_float64.nii", "gzip_bomb.nii.gz"):
            np.testing.assert_allclose(maps[name], maps["good.nii.gz"], atol=2e-3, err_msg=name)  # scale-free
        assert maps["outliers.nii.gz"].std() > 0.5 * maps["good.nii.gz"].std()  # two absurd voxels: not constant
    else:  # the unreadable ones with the fallback score, except the one whose score file cannot be named
        assert written == sorted(f"{n}.txt" for n in scored + failed if n != LONG_NAME)
    for name in failed:
        assert f"{name}: FAILED: " in stdout, name
    for name in (n for n, c in corpus.items() if c["outcome"] == "skipped"):
        assert f"skipping {name!r}" in stdout + stderr, name
    assert digest(tmp_path / "in") == before  # the inputs are unchanged, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(around + ["out"])  # nothing written beside


def test_a_stop_during_the_run_leaves_only_whole_outputs(tmp_path, default_models, normal_scans):
    import signal
    import time

    inputs = tmp_path / "in"
    inputs.mkdir()
    scan = sorted(normal_scans["brain"].glob("*.nii.gz"))[0]
    volume = np.asanyarray(nib.load(scan).dataobj).astype(np.float32)
    big = np.kron(volume, np.ones((4, 4, 4), np.float32))  # 144^3: its map takes a while to write
    for i in range(6):
        nib.save(nib.Nifti1Image(big + i, np.eye(4)), inputs / f"case_{i}.nii.gz")
    out = tmp_path / "out"
    child = run_script("run_pixel_brain.sh", inputs, out, default_models)
    deadline = time.time() + 300
    while time.time() < deadline and not (out.is_dir() and any(p.name.startswith("case_") for p in out.iterdir())):
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)  # as a scheduler or the grader's time limit stops it
    child.communicate(timeout=120)
    left = sorted(p.name for p in out.iterdir())
    assert left and all(n.startswith("case_") for n in left), left  # no partial file, no temporary folder
    for name in left:
        assert np.asanyarray(nib.load(out / name).dataobj).shape == big.shape  # every map is whole


@pytest.mark.parametrize("workflow", ["inference", "train"])
def test_help_of_a_bundle_workflow_prints_its_usage_and_does_no_work(workflow, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bundle"))
    command = [sys.executable, "-m", "monai.bundle", "run", "--meta_file", "bundle/configs/metadata.json",
               "--bundle_root", "bundle", "--config_file", repr(bundle_configs("bundle", workflow, "brain")),
               "--output_dir", str(tmp_path / "out"), "--help"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Settings (--key value)" in result.stdout and "monai.bundle run" in result.stdout
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_an_unknown_dataset_name_is_one_line_naming_the_valid_ones(tmp_path):
    for target in (["infer", f"IN={tmp_path}", f"OUT={tmp_path / 'out'}"], ["train", f"DATA={tmp_path}"]):
        result = subprocess.run(["make", "-n", *target, "DATASET=liver"], cwd=ROOT, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode != 0 and "DATASET must be one of: brain abdom xray; got 'liver'" in result.stderr
        assert "Traceback" not in result.stderr


ARGPARSE_ENTRY_POINTS = ["scripts.training.folds", "scripts.migrate_plans", "scripts.predict", "scripts.calibration",
                         "scripts.evaluate", "scripts.export", "tools.demo", "tools.report", "tools.preview",
                         "tools.phantoms", "tools.toy_data", "tools.hostile_inputs", "tools.xray_phantom"]


@pytest.mark.parametrize("module", ARGPARSE_ENTRY_POINTS)
def test_every_command_line_module_answers_help(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as stop:
        importlib.import_module(module).main(["--help"])
    assert stop.value.code == 0 and "usage:" in capsys.readouterr().out
