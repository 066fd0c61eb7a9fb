"""The MOOD submission image, built and run as the challenge's grader runs it (``make docker-test``).

    make docker-test    (PYTHONPATH=bundle:. python -m tools.docker_test [--output_dir outputs/docker-test])
    make docker-image   (with --build_only: step 1 alone, the image built and nothing run)

MOOD's ``scripts/test_docker.py`` (github.com/MIC-DKFZ/mood) runs ``docker run [--gpus all] -v <toy>:/mnt/data
-v <out>:/mnt/pred --read-only IMAGE sh /workspace/run_<task>_<dataset>.sh /mnt/data /mnt/pred`` for both tasks and
both datasets and scores the outputs. This does the same with podman, as root (the grader uses sudo), and with
no network:

1. makes the base image locally (``docker/make_base_image.sh``: debootstrap; no registry is reachable here) and
   builds ``docker/Dockerfile`` with the CPU build of torch (the wheel on this machine's disk, else PyPI's CPU
   index);
2. writes a small MOOD-layout toy set (``tools.toy_data``) and runs the four scripts natively from this checkout
   (the reference), then in the container: the output folder made as the grader makes it (``os.makedirs`` by
   root: owned by root, mode 755) for all four, and owned by another uid for one, called as the submission page
   writes it (the script itself, not ``sh`` script);
3. checks that every script exits 0 and every case has its output and nothing else is left; that the pixel maps
   have the input's shape and affine and values in [0, 1]; and that the outputs equal the native ones (the map's
   voxels and affine, the score's text), then scores them with the challenge's metric (``scripts.evaluate``);
4. prints the image size, the build time and the seconds per case in the container against native (each script's
   wall time over its cases, start-up included), and writes them to ``<output_dir>/docker_test.json``.

Every failed check is one line; the exit code is 1 if any check failed, 2 when podman cannot run here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from scripts.evaluate import evaluate
from scripts.files import is_scan
from tools.demo import run_script
from tools.toy_data import write_toy_dataset

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("brain", "abdom")
MODES = ("pixel", "sample")
IMAGE = "localhost/mood-anomaly:test"
BASE_IMAGE = "localhost/mood-base:bookworm"
TORCH = "torch-2.13.0+cpu"  # the Dockerfile's pin; the CPU wheel pip takes on these machines
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # Debian's; pip in the build trusts what the host trusts
OTHER_UID = 4321  # the owner of the second output folder: neither root nor the image's user
# the run into an output folder of another uid: one is enough, the scripts share their writer (scripts.files)
OTHER_OWNER_RUNS = (("pixel", "brain"),)

__all__ = ["check_outputs", "container_command", "main", "prediction_name"]


def prediction_name(scan: str, mode: str) -> str:
    """The file MOOD expects for ``scan``: the map under the scan's name, or the score in ``<name>.txt``."""
    return scan if mode == "pixel" else f"{scan}.txt"


def _read_score(path: Path) -> float:
    return float(path.read_text().strip())


def check_outputs(cases: Path, outputs: Path, mode: str, reference: Path | None = None) -> list[str]:
    """The problems of one run's ``outputs`` for the scans in ``cases`` (an empty list when there are none): a case
    without its output, a file that is no prediction, a map whose shape or affine differs from its scan's or with
    values outside [0, 1], a score outside [0, 1], and any output that differs from ``reference``'s (voxels and
    affine of a map, the text of a score)."""
    problems = []
    scans = sorted(p.name for p in cases.iterdir() if is_scan(p))
    expected = {prediction_name(scan, mode) for scan in scans}
    problems += [f"{outputs / name}: not a prediction of any scan"
                 for name in sorted({p.name for p in outputs.iterdir()} - expected)]
    for scan in scans:
        path = outputs / prediction_name(scan, mode)
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        other = reference / path.name if reference is not None else None
        if mode == "sample":
            try:
                score = _read_score(path)
            except ValueError:
                problems.append(f"{path}: not a number: {path.read_text()[:40]!r}")
                continue
            if not 0.0 <= score <= 1.0:
                problems.append(f"{path}: score {score} outside [0, 1]")
            if other is not None and (not other.is_file() or other.read_text() != path.read_text()):
                problems.append(f"{path}: differs from {other}")
            continue
        image, source = nib.load(path), nib.load(cases / scan)
        data = np.asarray(image.dataobj)
        if image.shape != source.shape:
            problems.append(f"{path}: shape {image.shape}, the scan's is {source.shape}")
        elif not np.allclose(image.affine, source.affine, rtol=0, atol=1e-5):
            problems.append(f"{path}: affine differs from the scan's")
        if not np.isfinite(data).all() or data.min() < 0 or data.max() > 1:
            problems.append(f"{path}: values outside [0, 1] (min {np.nanmin(data)}, max {np.nanmax(data)})")
        if other is not None:
            if not other.is_file():
                problems.append(f"{path}: {other} missing")
                continue
            reference_image = nib.load(other)
            expected_data = np.asarray(reference_image.dataobj)
            if expected_data.shape != data.shape:
                problems.append(f"{path}: differs from {other} (shape {expected_data.shape})")
            elif not np.array_equal(expected_data, data):
                difference = np.abs(expected_data.astype(np.float64) - data).max()
                problems.append(f"{path}: differs from {other} (voxels, max |difference| {difference:.3g})")
            elif not np.array_equal(reference_image.affine, image.affine):
                problems.append(f"{path}: differs from {other} (affine)")
    return problems


def container_command(image: str, mode: str, dataset: str, cases: Path, outputs: Path,
                      via_sh: bool = True) -> list[str]:
    """``podman run`` as MOOD's test_docker.py runs ``docker run`` (without ``--gpus all``), plus what the
    challenge's rules add: a read-only image (``--read-only``, and no writable /tmp either, as in Docker) and no
    network. ``via_sh=False``: the script itself as the command, as the challenge's submission page writes it."""
    script = f"/workspace/run_{mode}_{dataset}.sh"
    return ["podman", "run", "--rm", "--read-only", "--read-only-tmpfs=false", "--network", "none",
            "-v", f"{cases}:/mnt/data", "-v", f"{outputs}:/mnt/pred",
            image, *(["sh"] if via_sh else []), script, "/mnt/data", "/mnt/pred"]


def _run(cmd: list[str], log: Path) -> tuple[int, float]:
    """Run ``cmd`` with its output in ``log``; return the exit code and the wall time."""
    start = time.perf_counter()
    with log.open("w") as handle:
        rc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - start


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _torch_wheels() -> Path | None:
    """A folder holding the CPU wheel of the pinned torch (pip's find-links on these machines), or None."""
    for folder in [*os.environ.get("PIP_FIND_LINKS", "").split(), "/opt/wheels"]:
        if folder and list(Path(folder).glob(f"{TORCH}-*.whl")):
            return Path(folder)
    return None


def build_image(image: str, log: Path) -> float:
    """Make the base image if needed, then build docker/Dockerfile with the CPU torch; return the build's seconds."""
    rc, _ = _run(["bash", str(REPO / "docker" / "make_base_image.sh"), BASE_IMAGE], log.with_suffix(".base.log"))
    if rc != 0:
        raise SystemExit(f"docker-test: the base image failed:\n{_tail(log.with_suffix('.base.log'))}")
    cmd = ["podman", "build", "-f", "docker/Dockerfile", "-t", image, "--network", "host",
           "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}"]
    wheels = _torch_wheels()
    cmd += (["-v", f"{wheels}:/wheels:ro", "--build-arg", "TORCH_WHEELS=/wheels"] if wheels else
            ["--build-arg", f"TORCH_INDEX_URL={TORCH_CPU_INDEX}"])
    if CA_BUNDLE.is_file():
        cmd += ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    print(f"docker-test: building {image} (torch from {wheels or TORCH_CPU_INDEX}); log {log}", flush=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        rc = subprocess.run([*cmd, "."], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"docker-test: podman build failed ({rc}):\n{_tail(log)}")
    return time.perf_counter() - start


def _image_size(image: str) -> int:
    out = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", image],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


def _grader_folder(path: Path, owner: int) -> Path:
    """An empty output folder as the grader makes one (``os.makedirs`` under sudo: root, mode 755), then given to
    ``owner``."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    os.chmod(path, 0o755)
    os.chown(path, owner, owner)
    return path


def _podman_problem() -> str | None:
    if os.geteuid() != 0:
        return "docker-test runs podman as root, as the grader runs docker with sudo: run it as root"
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"docker-test needs {', '.join(missing)}: apt-get install podman runc debootstrap (make docker-setup)"
    return None


def run_docker_test(output_dir: Path, image: str = IMAGE, size: int = 64, cases: int = 2, build: bool = True) -> dict:
    output_dir.mkdir(parents=True, exist_ok=True)
    logs = output_dir / "logs"
    logs.mkdir(exist_ok=True)
    result = {"image": image, "problems": []}
    problems = result["problems"]
    if build:
        result["build_seconds"] = build_image(image, logs / "build.log")
    result["image_bytes"] = _image_size(image)

    runs = []  # (mode, dataset, owner of the output folder)
    runs += [(mode, dataset, 0) for dataset in DATASETS for mode in MODES]
    runs += [(mode, dataset, OTHER_UID) for mode, dataset in OTHER_OWNER_RUNS]
    seconds = {"native": {}, "container": {}}
    for dataset in DATASETS:
        write_toy_dataset(output_dir / "data", dataset, n_train=0, n_toy=cases, size=size, seed=0)
    for mode, dataset, owner in runs:
        data_dir = output_dir / "data" / dataset
        name = f"{mode}_{dataset}"
        native = output_dir / "native" / name
        if name not in seconds["native"]:
            shutil.rmtree(native, ignore_errors=True)
            try:
                seconds["native"][name] = run_script(mode, dataset, data_dir / "toy", native, quiet=True) / cases
            except RuntimeError as err:  # no reference: the container's outputs are still checked on their own
                problems.append(f"the native {err}")
                seconds["native"][name] = None
        out = _grader_folder(output_dir / "container" / f"{name}_uid{owner}", owner)
        log = logs / f"{name}_uid{owner}.log"
        print(f"docker-test: run_{name}.sh in the container, output folder owned by uid {owner}", flush=True)
        # test_docker.py's `sh SCRIPT` into the grader's folders; the submission page's bare `SCRIPT` into the other
        rc, wall = _run(container_command(image, mode, dataset, data_dir / "toy", out, via_sh=owner == 0), log)
        if owner == 0:
            seconds["container"][name] = wall / cases
        if rc != 0:
            problems.append(f"run_{name}.sh (output folder of uid {owner}) exited {rc}:\n{_tail(log)}")
            continue
        reference = native if seconds["native"][name] else None
        problems += check_outputs(data_dir / "toy", out, mode, reference)
        if owner == 0:
            folders = {"container": out, **({"native": reference} if reference else {})}
            result.setdefault("average_precision", {})[name] = {
                where: evaluate(data_dir, folder, mode)["average_precision"] for where, folder in folders.items()}
    result["seconds_per_case"] = seconds
    return result


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _summary(result: dict) -> str:
    lines = [f"image {result['image']}: {result['image_bytes'] / 1e9:.2f} GB"
             + (f", built in {result['build_seconds']:.0f} s" if "build_seconds" in result else "")]
    seconds = result["seconds_per_case"]
    for name, native in seconds["native"].items():
        container = seconds["container"].get(name)
        ap = result.get("average_precision", {}).get(name, {}).get("container")
        lines.append(f"  run_{name}.sh: {_seconds(container)} per case in the container, {_seconds(native)} native"
                     + (f" ({container / native:.2f}x)" if container and native else "")
                     + (f"; AP {ap:.3f}" if ap is not None else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/docker-test")
    parser.add_argument("--image", default=IMAGE)
    parser.add_argument("--size", type=int, default=64, help="side of the toy volumes")
    parser.add_argument("--cases", type=int, default=2, help="toy cases per dataset (half normal)")
    build = parser.add_mutually_exclusive_group()
    build.add_argument("--no_build", action="store_true", help="test the image as it is (built before)")
    build.add_argument("--build_only", action="store_true", help="build the image, run nothing (make docker-image)")
    args = parser.parse_args(argv)
    problem = _podman_problem()
    if problem:
        print(f"docker-test: error: {problem}", file=sys.stderr)
        return 2
    os.environ.setdefault("CONTAINERS_CONF", str(REPO / "docker" / "containers.conf"))
    output_dir = Path(args.output_dir).resolve()
    if args.build_only:
        (output_dir / "logs").mkdir(parents=True, exist_ok=True)
        seconds = build_image(args.image, output_dir / "logs" / "build.log")
        print(f"image {args.image}: {_image_size(args.image) / 1e9:.2f} GB, built in {seconds:.0f} s")
        return 0
    result = run_docker_test(output_dir, args.image, args.size, args.cases, build=not args.no_build)
    (output_dir / "docker_test.json").write_text(json.dumps(result, indent=1) + "\n")
    print(_summary(result))
    for problem in result["problems"]:
        print(f"docker-test: FAILED: {problem}", file=sys.stderr)
    print(f"docker-test: {'FAILED' if result['problems'] else 'passed'}: {output_dir / 'docker_test.json'}")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
