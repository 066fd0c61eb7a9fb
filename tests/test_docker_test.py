"""The checks of ``make docker-test`` (tools/docker_test.py) on hand-made outputs: each kind of wrong output is
reported, identical outputs are not. The image itself is built and run by ``make docker-test`` in CI."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest

from tools import docker_test
from tools.docker_test import check_outputs, container_command


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4) if affine is None else affine), path)


@pytest.fixture()
def run(tmp_path):
    """Two scans, a native run's outputs of both modes (the reference) and a copy of them (the container's)."""
    cases, native = tmp_path / "toy", tmp_path / "native"
    cases.mkdir()
    native.mkdir()
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for name in ("a.nii.gz", "b.nii.gz"):
        _save(cases / name, rng.normal(size=(6, 5, 4)), affine)
        _save(native / name, rng.uniform(size=(6, 5, 4)), affine)
        (native / f"{name}.txt").write_text("0.25")
    container = tmp_path / "container"
    shutil.copytree(native, container)
    return cases, native, container


@pytest.mark.parametrize("mode", ["pixel", "sample"])
def test_equal_outputs_pass(run, mode):
    cases, native, container = run
    for path in container.iterdir():  # each mode's folder holds only its own predictions
        if path.name.endswith(".txt") == (mode == "pixel"):
            path.unlink()
    assert check_outputs(cases, container, mode, reference=native) == []


def test_every_kind_of_wrong_map_is_named(run):
    cases, native, container = run
    for path in container.glob("*.txt"):
        path.unlink()
    (container / ".mood_tmp.x1").mkdir()  # a run that left its temporary folder behind
    _save(container / "a.nii.gz", np.full((6, 5, 4), 1.5), np.diag([2.0, 2.0, 2.0, 1.0]))  # out of range
    (container / "b.nii.gz").unlink()
    problems = check_outputs(cases, container, "pixel", reference=native)
    assert any(".mood_tmp.x1: not a prediction" in p for p in problems)
    assert any("a.nii.gz: values outside [0, 1]" in p for p in problems)
    assert any("a.nii.gz: differs from" in p and "(voxels, max |difference| " in p for p in problems)
    assert any("b.nii.gz: missing" in p for p in problems)

    shutil.copy(native / "b.nii.gz", container / "b.nii.gz")
    _save(container / "a.nii.gz", np.asarray(nib.load(native / "a.nii.gz").dataobj), np.eye(4))
    problems = check_outputs(cases, container, "pixel", reference=native)
    assert [p.split(": ")[1] for p in problems if "a.nii.gz" in p] == [
        "affine differs from the scan's", f"differs from {native / 'a.nii.gz'} (affine)"]

    _save(container / "a.nii.gz", np.zeros((6, 5, 5)), np.diag([2.0, 2.0, 2.0, 1.0]))
    assert any("shape (6, 5, 5), the scan's is (6, 5, 4)" in p for p in check_outputs(cases, container, "pixel"))


def test_every_kind_of_wrong_score_is_named(run):
    cases, native, container = run
    for path in container.glob("*.nii.gz"):
        path.unlink()
    (container / "a.nii.gz.txt").write_text("1.5")
    (container / "b.nii.gz.txt").write_text("nan?")
    problems = check_outputs(cases, container, "sample", reference=native)
    assert any("a.nii.gz.txt: score 1.5 outside [0, 1]" in p for p in problems)
    assert any("a.nii.gz.txt: differs from" in p for p in problems)
    assert any("b.nii.gz.txt: not a number" in p for p in problems)


def test_the_container_runs_as_the_grader_runs_it(tmp_path):
    command = container_command("img", "sample", "abdom", tmp_path / "toy", tmp_path / "out")
    assert command[:2] == ["podman", "run"]
    # MOOD's rules: nothing writable but the output folder, no network
    assert {"--read-only", "--read-only-tmpfs=false"} <= set(command)
    assert command[command.index("--network") + 1] == "none"
    assert f"{tmp_path / 'toy'}:/mnt/data" in command and f"{tmp_path / 'out'}:/mnt/pred" in command
    assert command[command.index("img") + 1:] == ["sh", "/workspace/run_sample_abdom.sh", "/mnt/data", "/mnt/pred"]
    bare = container_command("img", "pixel", "brain", tmp_path / "toy", tmp_path / "out", via_sh=False)
    assert bare[bare.index("img") + 1:] == ["/workspace/run_pixel_brain.sh", "/mnt/data", "/mnt/pred"]


def test_without_podman_it_says_so_in_one_line_and_fails(monkeypatch, capsys):
    monkeypatch.setattr(docker_test.os, "geteuid", lambda: 0)
    monkeypatch.setattr(docker_test.shutil, "which", lambda tool: None if tool == "podman" else f"/usr/bin/{tool}")
    assert docker_test.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["docker-test: error: docker-test needs podman: apt-get install podman runc debootstrap "
                   "(make docker-setup)"]
