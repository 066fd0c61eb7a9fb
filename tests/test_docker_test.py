"""The checks of ``make docker-test`` (tools/docker_test.py) on hand-made outputs: each kind of wrong output is
reported, identical outputs are not. The image itself is built and run by ``make docker-test`` in CI."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

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


def _fake_predictions(cases, outputs, mode, value=0.25):
    """What a run script writes: a map of ``value`` on each scan's grid, or the score ``value``."""
    outputs.mkdir(parents=True, exist_ok=True)
    for scan in sorted(cases.glob("*.nii.gz")):
        if mode == "pixel":
            source = nib.load(scan)
            _save(outputs / scan.name, np.full(source.shape, value), source.affine)
        else:
            (outputs / f"{scan.name}.txt").write_text(f"{value:.6f}")


@pytest.mark.skipif(docker_test.os.geteuid() != 0, reason="the grader's output folders are made by root")
@pytest.mark.parametrize("broken", [False, True])
def test_every_script_runs_natively_then_into_the_graders_folders(tmp_path, monkeypatch, broken):
    """The runs without podman: run_script and the container are replaced by writers of known outputs, so what is
    checked is which runs happen, into which folders, and that a wrong container output fails the test."""
    calls, natives = [], []

    def native(mode, dataset, cases, predictions, quiet):
        assert mode == "both"  # one native pass per dataset: the reference of both scripts
        natives.append(dataset)
        for task in ("pixel", "sample"):
            _fake_predictions(cases, predictions, task)
        return 2.0 * len(list(cases.glob("*.nii.gz")))  # 2 s per case

    def container(cmd, log):
        mounts = dict(reversed(m.split(":")) for m in cmd if m.endswith((":/mnt/data", ":/mnt/pred")))
        out = Path(mounts["/mnt/pred"])
        calls.append((cmd[-3], out.stat().st_uid, stat.S_IMODE(out.stat().st_mode), cmd[-4] == "sh"))
        mode = "pixel" if "run_pixel" in cmd[-3] else "sample"
        wrong = broken and cmd[-3].endswith("run_sample_abdom.sh")
        _fake_predictions(Path(mounts["/mnt/data"]), out, mode, value=0.5 if wrong else 0.25)
        log.write_text("")
        return 0, 3.0 * 2

    monkeypatch.setattr(docker_test, "run_script", native)
    monkeypatch.setattr(docker_test, "_run", container)
    monkeypatch.setattr(docker_test, "_inspect", lambda image, field: "123" if field == "{{.Size}}" else "id")
    result = docker_test.run_docker_test(tmp_path / "out", size=16, cases=2, build_first=False)
    scripts = [f"/workspace/run_{m}_{d}.sh" for d in ("brain", "abdom") for m in ("pixel", "sample")]
    # all four into root's 755 folders through `sh`, then one into another uid's folder as the bare script
    assert calls == [(s, 0, 0o755, True) for s in scripts] + [(scripts[2], docker_test.OTHER_UID, 0o755, False)]
    assert natives == ["brain", "abdom"] and result["seconds_per_case"]["native"]["brain"] == 2.0
    assert result["seconds_per_case"]["container"]["pixel_brain"] == 3.0
    if broken:
        assert [p.split(": ")[1] for p in result["problems"]] == ["differs from " + str(
            tmp_path / "out/native/abdom" / name) for name in ("toy_0.nii.gz.txt", "toy_1.nii.gz.txt")]
    else:
        assert result["problems"] == [] and all(result["byte_identical"].values())


def test_build_only_records_the_build_that_a_later_run_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(docker_test, "_podman_problem", lambda: None)
    monkeypatch.setattr(docker_test, "build_image",
                        lambda image, log: {"image_id": "abc", "build_seconds": 129.0, "torch": "2.13.0+cpu"})
    monkeypatch.setattr(docker_test, "_inspect", lambda image, field: "1880000000" if field == "{{.Size}}" else "abc")
    assert docker_test.main(["--build_only", "--output_dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().endswith("1.88 GB, torch 2.13.0+cpu, built in 129 s")
    assert docker_test._build_record(tmp_path, "img")["build_seconds"] == 129.0
    # the image was rebuilt since: its record is not this image's
    monkeypatch.setattr(docker_test, "_inspect", lambda image, field: "def")
    assert docker_test._build_record(tmp_path, "img") == {}
