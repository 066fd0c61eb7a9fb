"""Inference speed and memory with the full default ensemble, on MOOD-sized cases.

Run from the repository root::

    PYTHONPATH=bundle .venv/bin/python bench/bench_inference.py [--cases 3] [--datasets brain abdom]
        [--mode pixel] [--folds 5] [--model_formats pytorch onnx torchscript] [--json PATH]

Writes MOOD-sized toy cases (brain 256^3 float32 from the MNI152 phantom, abdomen 512^3 int16 CT phantom),
an ensemble of ``--folds`` default networks (random weights: the timing does not depend on them), runs
the bundle's inference command in a child process and reports the median seconds per case from its
progress lines, its peak resident memory, and the pure I/O time of one case (reading the input and writing a
float32 map of the same shape with nibabel) measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))
sys.path.insert(1, str(REPO))  # the tools (tools.phantoms)


from scripts.export import export_dataset  # noqa: E402
from scripts.files import bundle_configs, save_json  # noqa: E402
from scripts.plans import build_network, default_plan, ensure_plan  # noqa: E402
from tools.phantoms import brain_partner, ct_phantom, mni152_brain  # noqa: E402

SIZES = {"brain": 256, "abdom": 512}


def write_cases(folder: Path, dataset: str, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    if dataset == "brain":
        template, foreground = mni152_brain(SIZES["brain"])
    for i in range(count):
        if dataset == "brain":
            volume, _ = brain_partner(template, foreground, seed=i)
            volume = ((volume - volume.min()) / (volume.max() - volume.min())).astype(np.float32)
            affine = np.eye(4)
        else:  # a 256^3 phantom doubled along every axis: MOOD's 512^3 shape without 512^3 phantom cost
            half, _ = ct_phantom(SIZES["abdom"] // 2, seed=i)
            volume = np.round(half).astype(np.int16).repeat(2, 0).repeat(2, 1).repeat(2, 2)
            affine = np.diag([0.7, 0.7, 0.7, 1.0])
        path = folder / f"toy_{i}.nii.gz"
        nib.save(nib.Nifti1Image(volume, affine), path)
        paths.append(path)
    return paths


def write_models(models_dir: Path, dataset: str, folds: int) -> None:
    """``folds`` default networks (random weights) with the plan training makes by default (train.yaml's grid)."""
    fingerprint = {"percentile_00_5": -1000.0, "percentile_99_5": 1000.0, "mean": -100.0, "std": 400.0}
    plan = default_plan(dataset, fingerprint=fingerprint if dataset == "abdom" else None)
    folder = models_dir / dataset
    ensure_plan(folder, plan)
    for fold in range(folds):
        torch.manual_seed(fold)
        torch.save(build_network(plan).state_dict(), folder / f"fold_{fold}.pt")


def io_seconds(path: Path, out_dir: Path) -> float:
    start = time.perf_counter()
    image = nib.load(path)
    data = np.asanyarray(image.dataobj).astype(np.float32)
    nib.save(nib.Nifti1Image(data, image.affine), out_dir / f"io_{path.name}")
    return time.perf_counter() - start


def run_inference(dataset: str, cases: Path, out: Path, models: Path, mode: str,
                  model_format: str = "pytorch") -> tuple[list[float], float]:
    """Seconds per case from the progress lines and the child's own peak resident memory (GB)."""
    command = [sys.executable, "-m", "monai.bundle", "run",
               "--meta_file", "bundle/configs/metadata.json", "--bundle_root", "bundle",
               "--config_file", repr(bundle_configs("bundle", "inference", dataset)),
               "--dataset_dir", str(cases), "--output_dir", str(out), "--mode", mode, "--models_dir", str(models),
               "--model_format", model_format]
    env = dict(os.environ, PYTHONPATH=str(REPO / "bundle"))
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr, text=True)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage (Linux: ru_maxrss in kilobytes)
        child.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0), stderr.seek(0)
        if child.returncode != 0:
            raise RuntimeError(stderr.read()[-3000:])
        seconds = [float(m) for m in re.findall(r"^\[\d+/\d+\] .*?: ([\d.]+) s", stdout.read(), re.M)]
    return seconds, usage.ru_maxrss / 1024 / 1024


def main(argv=None) -> dict:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--cases", type=int, default=3)
    cli.add_argument("--datasets", nargs="+", default=["brain", "abdom"])
    cli.add_argument("--mode", default="pixel", choices=("pixel", "sample"))
    cli.add_argument("--folds", type=int, default=5)
    cli.add_argument("--model_formats", nargs="+", default=["pytorch"], choices=("pytorch", "torchscript", "onnx"),
                     help="run the ensemble from the state dicts and/or their exports (made here by scripts.export)")
    cli.add_argument("--json", default=str(REPO / "bench/results/inference.json"))
    args = cli.parse_args(argv)
    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "folds": args.folds, "mode": args.mode,
              "datasets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for dataset in args.datasets:
            cases = write_cases(work / dataset / "cases", dataset, args.cases)
            write_models(work / "models", dataset, args.folds)
            exports = [f for f in args.model_formats if f != "pytorch"]
            if exports:
                export_dataset(work / "models", dataset, exports, bundle_root=REPO / "bundle")
            io = [io_seconds(p, work / dataset) for p in cases]
            result["datasets"][dataset] = {"shape": list(nib.load(cases[0]).shape),
                                           "median_io_seconds": statistics.median(io)}
            for model_format in args.model_formats:
                seconds, peak_gb = run_inference(dataset, cases[0].parent, work / dataset / model_format,
                                                 work / "models", args.mode, model_format)
                result["datasets"][dataset][model_format] = {
                    "cases": len(seconds), "median_seconds_per_case": statistics.median(seconds),
                    "seconds_per_case": seconds, "peak_memory_gb": round(peak_gb, 2),
                    "ratio_to_io": statistics.median(seconds) / statistics.median(io),
                }
            shutil.rmtree(work / dataset)
            print(json.dumps({dataset: result["datasets"][dataset]}, indent=1), flush=True)
    save_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
