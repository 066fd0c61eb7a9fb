"""The MOOD submission image, built and run as the challenge's grader runs it (``make docker-test``).

    make docker-test    (PYTHONPATH=bundle:. python -m tools.docker_test [--output_dir outputs/docker-test])
    make docker-image   (with --build_only: step 1 alone, the image built and nothing run)
    ... --no_build      (the image as it is; the build time from the record docker-image left for that image)

MOOD's ``scripts/test_docker.py`` (github.com/MIC-DKFZ/mood) runs ``docker run [--gpus all] -v <toy>:/mnt/data
-v <out>:/mnt/pred --read-only IMAGE sh /workspace/run_<task>_<dataset>.sh /mnt/data /mnt/pred`` for both tasks and
both datasets and scores the outputs. This does the same with podman, as root (the grader uses sudo), and with
no network:

1. makes the base image locally (``docker/make_base_image.sh``: debootstrap; no registry is reachable here) and
   builds ``docker/Dockerfile`` with the CPU build of torch (the wheel on this machine's disk, else PyPI's CPU
   index), and checks that the torch inside is the CPU build;
2. writes a small MOOD-layout toy set (``tools.toy_data``) and scores it natively from this checkout (the
   reference: the four scripts' shared body, ``run_mood.sh both``, one pass per dataset that writes exactly what
   the pixel and the sample script write, ``tests/test_predict.py``), then runs the four scripts in the
   container: the output folder made as the grader makes it (``os.makedirs`` by root: owned by root, mode 755) for
   all four, and owned by another uid for one, called as the submission page writes it (the script itself, not
   ``sh`` script);
3. checks that every script exits 0 and every case has its output and nothing else is left; that the pixel maps
   have the input's shape and affine and values in [0, 1]; and that the outputs equal the native ones (the map's
   voxels and affine, the score's text; whether the files are byte-identical too is recorded, not required, as
   another zlib may compress the same map differently), then scores them with the challenge's metric
   (``scripts.evaluate``);
4. prints the image size, the build time and the seconds per case in the container against native (each run's
   wall time over its cases, start-up included; natively one pass per dataset), and writes them to
   ``<output_dir>/docker_test.json``.

Every failed check is one line; the exit code is 1 if any check failed, 2 when podman cannot run here.
"""

from __future__ import annotations

import argparse
import filecmp
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
from scripts.io.files import MOOD_DATASETS, is_scan
from tools.demo import run_script
from tools.toy_data import write_toy_dataset

REPO = Path(__file__).resolve().parents[1]
DATASETS = MOOD_DATASETS
MODES = ("pixel", "sample")
IMAGE = "localhost/mood-anomaly:test"
BASE_IMAGE = "localhost/mood-base:bookworm"
# the Dockerfile's pin, as the CPU wheel for the base image's Python (Debian bookworm: 3.11)
TORCH_WHEEL = "torch-2.13.0+cpu-cp311-*.whl"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # Debian's; pip in the build trusts what the host trusts
OTHER_UID = 4321  # the owner of the second output folder: neither root nor the image's user
# the run into an output folder of another uid: one is enough, the scripts share their writer (scripts.io.files);
# the abdomen's, whose models score a case in about half the brain's time
OTHER_OWNER_RUNS = (("pixel", "abdom"),)

__all__ = ["check_outputs", "container_command", "main", "prediction_name"]


def prediction_name(scan: str, mode: str) -> str:
    """The file MOOD expects for ``scan``: the map under the scan's name, or the score in ``<name>.txt``."""
    return scan if mode == "pixel" else f"{scan}.txt"


def _score_problems(path: Path, other: Path | None) -> list[str]:
    text = path.read_text()
    try:
        score = float(text.strip())
    except ValueError:
        return [f"{path}: not a number: {text[:40]!r}"]
    problems = [] if 0.0 <= score <= 1.0 else [f"{path}: score {score} outside [0, 1]"]
    if other is not None and (not other.is_file() or other.read_text() != text):
        problems.append(f"{path}: differs from {other}")
    return problems


def _map_problems(path: Path, scan: Path, other: Path | None) -> list[str]:
    image, source = nib.load(path), nib.load(scan)
    data = np.asarray(image.dataobj)
    problems = []
    if image.shape != source.shape:
        problems.append(f"{path}: shape {image.shape}, the scan's is {source.shape}")
    elif not np.allclose(image.affine, source.affine, rtol=0, atol=1e-5):
        problems.append(f"{path}: affine differs from the scan's")
    if not np.isfinite(data).all() or data.min() < 0 or data.max() > 1:
        problems.append(f"{path}: values outside [0, 1] (min {np.nanmin(data)}, max {np.nanmax(data)})")
    if other is None:
        return problems
    if not other.is_file():
        return [*problems, f"{path}: {other} missing"]
    reference = nib.load(other)
    expected = np.asarray(reference.dataobj)
    if expected.shape != data.shape:
        problems.append(f"{path}: differs from {other} (shape {expected.shape})")
    elif not np.array_equal(expected, data):
        difference = np.abs(expected.astype(np.float64) - data).max()
        problems.append(f"{path}: differs from {other} (voxels, max |difference| {difference:.3g})")
    elif not np.array_equal(reference.affine, image.affine):
        problems.append(f"{path}: differs from {other} (affine)")
    return problems


def check_outputs(cases: Path, outputs: Path, mode: str, reference: Path | None = None) -> list[str]:
    """The problems of one run's ``outputs`` for the scans in ``cases`` (an empty list when there are none): a case
    without its output, a file that is no prediction or cannot be read, a map whose shape or affine differs from
    its scan's or with values outside [0, 1], a score outside [0, 1], and any output that differs from
    ``reference``'s (voxels and affine of a map, the text of a score)."""
    scans = sorted(p.name for p in cases.iterdir() if is_scan(p))
    expected = {prediction_name(scan, mode) for scan in scans}
    problems = [f"{outputs / name}: not a prediction of any scan"
                for name in sorted({p.name for p in outputs.iterdir()} - expected)]
    for scan in scans:
        path = outputs / prediction_name(scan, mode)
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        other = reference / path.name if reference is not None else None
        try:
            problems += _score_problems(path, other) if mode == "sample" else _map_problems(path, cases / scan, other)
        except Exception as err:  # a truncated map, a binary score file: a problem of this case, not a crash
            problems.append(f"{path}: unreadable: {type(err).__name__}: {err}")
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
        if folder and list(Path(folder).glob(TORCH_WHEEL)):
            return Path(folder)
    return None


def build_image(image: str, log: Path) -> dict:
    """Make the base image if needed, then build docker/Dockerfile with the CPU torch; return the build's record
    (image id, seconds, the torch inside), which ``<output_dir>/build.json`` keeps for a later ``--no_build``."""
    rc, _ = _run(["bash", str(REPO / "docker" / "make_base_image.sh"), BASE_IMAGE], log.with_suffix(".base.log"))
    if rc != 0:
        raise SystemExit(f"docker-test: the base image failed:\n{_tail(log.with_suffix('.base.log'))}")
    cmd = ["podman", "build", "-f", str(REPO / "docker" / "Dockerfile"), "-t", image, "--network", "host",
           "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}"]
    wheels = _torch_wheels()
    cmd += (["-v", f"{wheels}:/wheels:ro", "--build-arg", "TORCH_WHEELS=/wheels"] if wheels else
            ["--build-arg", f"TORCH_INDEX_URL={TORCH_CPU_INDEX}"])
    if CA_BUNDLE.is_file():
        cmd += ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    print(f"docker-test: building {image} (torch from {wheels or TORCH_CPU_INDEX}); log {log}", flush=True)
    rc, seconds = _run([*cmd, str(REPO)], log)  # the repository is the build context (.dockerignore)
    if rc != 0:
        raise SystemExit(f"docker-test: podman build failed ({rc}):\n{_tail(log)}")
    torch = subprocess.run(["podman", "run", "--rm", "--network", "none", image, "python", "-c",
                            "import torch; print(torch.__version__)"], capture_output=True, text=True).stdout.strip()
    if not torch.endswith("+cpu"):  # e.g. a wheel pip could not use, so PyPI's CUDA build came in instead
        raise SystemExit(f"docker-test: the image has torch {torch or '(none)'}, not the CPU build")
    return {"image_id": _inspect(image, "{{.Id}}"), "build_seconds": seconds, "torch": torch}


def _inspect(image: str, field: str) -> str:
    result = subprocess.run(["podman", "image", "inspect", "--format", field, image], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"docker-test: no image {image}: build it first (make docker-image)")
    return result.stdout.strip()


def _build_record(output_dir: Path, image: str) -> dict:
    """The record of the build that made ``image`` as it is now, if ``build.json`` holds it."""
    try:
        record = json.loads((output_dir / "build.json").read_text())
    except (OSError, ValueError):
        return {}
    return record if record.get("image_id") == _inspect(image, "{{.Id}}") else {}


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


def build(output_dir: Path, image: str = IMAGE) -> dict:
    """Build ``image`` (step 1 of the module's docstring) and keep the record in ``<output_dir>/build.json``."""
    (output_dir / "logs").mkdir(parents=True, exist_ok=True)
    record = build_image(image, output_dir / "logs" / "build.log")
    (output_dir / "build.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def run_docker_test(output_dir: Path, image: str = IMAGE, size: int = 64, cases: int = 2,
                    build_first: bool = True) -> dict:
    """Steps 1-3 of the module's docstring (1 only with ``build_first``, else the record of the image's build, if
    any); returns the result that ``main`` prints and writes: the problems, the image's size and build, the
    seconds per case and the average precisions."""
    output_dir.mkdir(parents=True, exist_ok=True)
    logs = output_dir / "logs"
    logs.mkdir(exist_ok=True)
    result = {"image": image, "problems": []}
    problems = result["problems"]
    result.update(build(output_dir, image) if build_first else _build_record(output_dir, image))
    result["image_bytes"] = int(_inspect(image, "{{.Size}}"))

    runs = []  # (mode, dataset, owner of the output folder)
    runs += [(mode, dataset, 0) for dataset in DATASETS for mode in MODES]
    runs += [(mode, dataset, OTHER_UID) for mode, dataset in OTHER_OWNER_RUNS]
    seconds = {"native": {}, "container": {}}  # native: per dataset (one pass for both tasks)
    shutil.rmtree(output_dir / "data", ignore_errors=True)  # only this run's cases (the times are per case)
    for dataset in DATASETS:
        write_toy_dataset(output_dir / "data", dataset, n_train=0, n_toy=cases, size=size, seed=0)
    for mode, dataset, owner in runs:
        data_dir = output_dir / "data" / dataset
        name = f"{mode}_{dataset}"
        native = output_dir / "native" / dataset
        if dataset not in seconds["native"]:
            shutil.rmtree(native, ignore_errors=True)
            try:
                seconds["native"][dataset] = run_script("both", dataset, data_dir / "toy", native, quiet=True) / cases
            except RuntimeError as err:  # no reference: the container's outputs are still checked on their own
                problems.append(f"the native {err}")
                seconds["native"][dataset] = None
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
        reference = native if seconds["native"][dataset] is not None else None
        problems += check_outputs(data_dir / "toy", out, mode, reference)
        if reference is not None:  # beyond the check: the files themselves, gzip stream included
            result.setdefault("byte_identical", {})[f"{name}_uid{owner}"] = all(
                (reference / path.name).is_file() and filecmp.cmp(path, reference / path.name, shallow=False)
                for path in out.iterdir())
        if owner == 0:  # the native outputs are the same files (checked above)
            result.setdefault("average_precision", {})[name] = evaluate(data_dir, out, mode)["average_precision"]
    result["seconds_per_case"] = seconds
    return result


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _summary(result: dict) -> str:
    lines = [f"image {result['image']}: {result['image_bytes'] / 1e9:.2f} GB"
             + (f", torch {result['torch']}, built in {result['build_seconds']:.0f} s" if "torch" in result else "")]
    seconds = result["seconds_per_case"]
    for name, container in seconds["container"].items():
        native = seconds["native"].get(name.split("_", 1)[1])
        ap = result.get("average_precision", {}).get(name)
        lines.append(f"  run_{name}.sh: {_seconds(container)} per case in the container, {_seconds(native)} native"
                     " (both tasks' one pass)"
                     + (f" ({container / native:.2f}x)" if container is not None and native is not None else "")
                     + (f"; AP {ap:.3f}" if ap is not None else ""))
    identical = result.get("byte_identical", {})
    if identical:
        lines.append(f"  byte for byte equal to the native files: {sum(identical.values())} of {len(identical)} runs")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/docker-test")
    parser.add_argument("--image", default=IMAGE)
    parser.add_argument("--size", type=int, default=64, help="side of the toy volumes")
    parser.add_argument("--cases", type=int, default=2, help="toy cases per dataset (half normal)")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--no_build", action="store_true", help="test the image as it is (built before)")
    when.add_argument("--build_only", action="store_true", help="build the image, run nothing (make docker-image)")
    args = parser.parse_args(argv)
    problem = _podman_problem()
    if problem:
        print(f"docker-test: error: {problem}", file=sys.stderr)
        return 2
    os.environ.setdefault("CONTAINERS_CONF", str(REPO / "docker" / "containers.conf"))
    output_dir = Path(args.output_dir).resolve()
    if args.build_only:
        record = build(output_dir, args.image)
        print(f"image {args.image}: {int(_inspect(args.image, '{{.Size}}')) / 1e9:.2f} GB, torch {record['torch']}, "
              f"built in {record['build_seconds']:.0f} s")
        return 0
    result = run_docker_test(output_dir, args.image, args.size, args.cases, build_first=not args.no_build)
    (output_dir / "docker_test.json").write_text(json.dumps(result, indent=1) + "\n")
    print(_summary(result))
    for problem in result["problems"]:
        print(f"docker-test: FAILED: {problem}", file=sys.stderr)
    print(f"docker-test: {'FAILED' if result['problems'] else 'passed'}: {output_dir / 'docker_test.json'}")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
