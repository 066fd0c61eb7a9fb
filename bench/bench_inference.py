"""Inference speed, memory and outputs on MOOD-sized cases, against the previous release and the pure I/O floor.

Run from the repository root (``make bench-inference``)::

    PYTHONPATH=bundle .venv/bin/python bench/bench_inference.py [--cases 3] [--datasets brain abdom]
        [--models_dir bundle/models] [--reference 9e78e34] [--reference_models auto|same|own]
        [--model_formats pytorch] [--json PATH]

For each dataset it writes labelled toy cases at MOOD's size (``tools.toy_data``: brain 256^3, abdomen 512^3) and
runs, in child processes of the bundle's inference command on the same cases and models:

- the reference: the bundle of the ``--reference`` commit (by default the last release before one pass wrote both
  outputs), once with ``--mode pixel`` and once with ``--mode sample``, as its users had to. It runs the same
  models (``--reference_models same``) or the models that commit shipped (``own``: release against release, as
  users get them; the output check then does not apply). ``auto`` (default): the same models where they are
  networks only, the reference's own where the folder holds voxel classifiers, which that release cannot read;
- this checkout with ``--mode both``: one pass of the ensemble per case for both outputs.

It reports the median seconds per case of each run (from the progress lines), the median seconds of each stage
of this checkout's cases (load, preprocess, network, inverse, write: its progress lines), each run's peak
resident memory, and in the same process the pure I/O floor of a case: reading the scan as the bundle's reader
does and writing its map's stored values again, both with the bundle's I/O (ISA-L gzip). The reference's float32
maps are written again by the bundle's writer in each data type it offers and by nibabel's default (the float32
map through zlib): seconds, size and MOOD's pixel AP of each (what chose float16). It reports how far the outputs
moved against the reference's (the largest score and voxel changes, and MOOD's pixel and sample AP change, by
``scripts.evaluate``) next to ``TARGETS``; it records, it does not fail. Results go to ``--json`` (default
``bench/results/inference.json``).
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
sys.path.insert(1, str(REPO))  # the tools (tools.toy_data)

from scripts.evaluate import evaluate  # noqa: E402
from scripts.export import export_dataset  # noqa: E402
from scripts.inference.writers import DEFAULT_PIXEL_MAP_DTYPE, PIXEL_MAP_DTYPES, WritePixelMapd  # noqa: E402
from scripts.io.files import bundle_configs, save_json  # noqa: E402
from scripts.io.nifti import fast_gzip_in_use, reverse_axes, use_fast_gzip  # noqa: E402
from tools.toy_data import write_toy_dataset  # noqa: E402

# 0.7.1, the last release before `--mode both`, float16 maps and ISA-L
DEFAULT_REFERENCE = "9e78e34"
STAGES = ("load", "preprocess", "network", "summarise", "inverse", "write")
CASE_LINE = re.compile(r"^\[\d+/\d+\] (\S.*?): ([\d.]+) s(?: score [\d.]+)?(?: FLAGGED)?(?: \((.*?) s\))?"
                       r"(?:; .* left)?$", re.M)
TARGETS = {"brain_both_to_reference": 0.6, "abdom_both_to_reference_pixel": 0.6, "write_to_nibabel": 0.3,
           "peak_memory_gb_512": 3.0, "gpu_ratio_to_io": 1.2, "ap_change": 1e-4, "score_change": 1e-5}


def from_commit(commit: str, paths: list[str], folder: Path) -> Path:
    """``paths`` of ``commit`` extracted from git into ``folder``; returns ``folder / "bundle"``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit, *paths],
                             capture_output=True, check=True).stdout
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder / "bundle"


def reference_bundle(commit: str, folder: Path) -> Path:
    """The bundle (configs and code) of ``commit``."""
    return from_commit(commit, ["bundle/configs", "bundle/scripts"], folder)


def reference_models(commit: str, folder: Path) -> Path:
    """The models folder ``commit`` shipped (``bundle/models``)."""
    return from_commit(commit, ["bundle/models"], folder) / "models"


def holds_classifiers(models: Path, datasets) -> bool:
    """Whether a dataset's folder in ``models`` holds voxel classifiers (what releases before 0.13.0 cannot read)."""
    return any(any((models / d).glob("classifier_*.txt")) for d in datasets)


def run_inference(bundle: Path, dataset: str, cases: Path, out: Path, models: Path, mode: str,
                  model_format: str = "pytorch") -> dict:
    """One inference run in a child process: seconds per case and per stage from its progress lines, and the
    child's own peak resident memory (GB)."""
    command = [sys.executable, "-m", "monai.bundle", "run",
               "--meta_file", str(bundle / "configs/metadata.json"), "--bundle_root", str(bundle),
               "--config_file", repr(bundle_configs(bundle, "inference", dataset)),
               "--dataset_dir", str(cases), "--output_dir", str(out), "--mode", mode, "--models_dir", str(models)]
    if model_format != "pytorch":
        command += ["--model_format", model_format]
    env = dict(os.environ, PYTHONPATH=str(bundle))
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr, text=True)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage (Linux: ru_maxrss in kilobytes)
        stdout.seek(0), stderr.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{mode} run of {bundle} failed: {stderr.read()[-3000:]}")
        lines = CASE_LINE.findall(stdout.read())
    stages = {}
    for _, _, split in lines:
        for part in filter(None, (split or "").split(", ")):
            stage, seconds = part.rsplit(" ", 1)
            stages.setdefault(stage, []).append(float(seconds))
    seconds = [float(s) for _, s, _ in lines]
    return {"cases": len(seconds), "median_seconds_per_case": statistics.median(seconds),
            "seconds_per_case": seconds, "median_stage_seconds": {k: statistics.median(v) for k, v in stages.items()},
            "peak_memory_gb": round(usage.ru_maxrss / 1024 / 1024, 2)}


def io_floor(scan: Path, pixel_map: Path, out_dir: Path) -> dict:
    """Seconds to read ``scan`` as the bundle's reader does (ISA-L, C-ordered) and to write ``pixel_map``'s stored
    values again as the bundle stored them (its data type and slope, ISA-L), with no other work."""
    stored = nib.load(pixel_map)
    values = np.asanyarray(stored.dataobj.get_unscaled())  # as the writer hands them to nibabel (not timed)
    start = time.perf_counter()
    image = nib.load(scan)
    reverse_axes(torch.from_numpy(np.asanyarray(image.dataobj).T))
    loaded = time.perf_counter()
    out = nib.Nifti1Image(values, image.affine)
    out.header.set_slope_inter(stored.dataobj.slope, 0.0)
    nib.save(out, out_dir / f"floor_{scan.name}")
    return {"load": loaded - start, "save": time.perf_counter() - loaded, "total": time.perf_counter() - start}


def map_dtypes(data_dir: Path, float32_maps: Path, out_dir: Path) -> dict:
    """What the pixel map's data type costs and changes: every case's float32 map (the reference's output) written
    by the bundle's writer in each of :data:`PIXEL_MAP_DTYPES` (median seconds per map, mean MB per file, MOOD's
    pixel AP of the written maps and its change from the float32 maps'), and by nibabel's default (the float32
    map as it is, C-ordered, through zlib: as the previous release wrote it)."""
    scans = sorted((data_dir / "toy").glob("*.nii.gz"))
    result = {}
    for dtype in (*PIXEL_MAP_DTYPES, "nibabel_default"):
        folder = out_dir / dtype
        seconds = []
        for scan in scans:
            values = np.ascontiguousarray(np.asanyarray(nib.load(float32_maps / scan.name).dataobj, dtype=np.float32))
            start = time.perf_counter()
            if dtype == "nibabel_default":
                fast = fast_gzip_in_use()
                use_fast_gzip(False)
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                    nib.save(nib.Nifti1Image(values, nib.load(scan).affine), folder / scan.name)
                finally:
                    use_fast_gzip(fast)
            else:
                case = {"name": scan.name, "image_path": str(scan), "error": "", "pred": torch.from_numpy(values)[None]}
                WritePixelMapd(output_dir=folder, dtype=dtype)(case)
            seconds.append(time.perf_counter() - start)
        result[dtype] = {"write_seconds": statistics.median(seconds),
                         "megabytes": statistics.mean((folder / p.name).stat().st_size for p in scans) / 2**20,
                         "pixel_ap": evaluate(data_dir, folder, "pixel")["average_precision"]}
    reference = evaluate(data_dir, float32_maps, "pixel")["average_precision"]
    for entry in result.values():
        entry["ap_change"] = None if reference is None else entry["pixel_ap"] - reference
    default = result[DEFAULT_PIXEL_MAP_DTYPE]["write_seconds"]
    result["write_to_nibabel_default"] = default / result["nibabel_default"]["write_seconds"]
    return result


def compare_outputs(data_dir: Path, reference: dict[str, Path], current: Path) -> dict:
    """MOOD's AP of both sets of outputs, and the largest score and map differences."""
    result = {}
    for mode in ("pixel", "sample"):
        before = evaluate(data_dir, reference[mode], mode)["average_precision"]
        after = evaluate(data_dir, current, mode)["average_precision"]
        result[f"{mode}_ap"] = {"reference": before, "current": after,
                                "change": None if before is None or after is None else after - before}
    names = [p.name for p in sorted((data_dir / "toy").glob("*.nii.gz"))]
    result["largest_score_change"] = max(abs(float((reference["sample"] / f"{n}.txt").read_text())
                                             - float((current / f"{n}.txt").read_text())) for n in names)
    result["largest_map_change"] = max(
        float(np.abs(np.asanyarray(nib.load(reference["pixel"] / name).dataobj)
                     - np.asanyarray(nib.load(current / name).dataobj)).max())
        for name in names)
    return result


def bench_dataset(dataset: str, args, work: Path, reference: Path | None, reference_models: Path | None = None
                  ) -> dict:
    write_toy_dataset(work / "data", dataset, n_train=0, n_toy=args.cases, size=args.size, seed=args.seed)
    data_dir = work / "data" / dataset
    cases = data_dir / "toy"
    scans = sorted(cases.glob("*.nii.gz"))
    result = {"shape": list(nib.load(scans[0]).shape), "cases": len(scans)}
    outputs = {}
    if reference is not None:
        for mode in ("pixel", "sample"):
            outputs[mode] = work / "reference" / dataset / mode
            result[f"reference_{mode}"] = run_inference(reference, dataset, cases, outputs[mode],
                                                        reference_models or args.models_dir, mode)
    for model_format in args.model_formats:
        out = work / "current" / dataset / model_format
        result[f"both_{model_format}"] = run_inference(REPO / "bundle", dataset, cases, out, args.models_dir, "both",
                                                       model_format)
    current = work / "current" / dataset / args.model_formats[0]
    floors = [io_floor(p, current / p.name, work) for p in scans]
    result["io_floor_seconds"] = {k: statistics.median(f[k] for f in floors) for k in floors[0]}
    for model_format in args.model_formats:
        run = result[f"both_{model_format}"]
        run["ratio_to_io"] = run["median_seconds_per_case"] / result["io_floor_seconds"]["total"]
    if reference is not None:
        ref_both = result["reference_pixel"]["median_seconds_per_case"] + result["reference_sample"][
            "median_seconds_per_case"]
        both = result[f"both_{args.model_formats[0]}"]["median_seconds_per_case"]
        result["both_to_reference_pixel_plus_sample"] = both / ref_both
        result["both_to_reference_pixel"] = both / result["reference_pixel"]["median_seconds_per_case"]
        # other models: the outputs differ by design (their APs on these few cases say little); not compared
        result["outputs"] = None if reference_models else compare_outputs(data_dir, outputs, current)
        result["map_dtypes"] = map_dtypes(data_dir, outputs["pixel"], work / "map_dtypes")
    shutil.rmtree(work / "data" / dataset)
    return result


def tables(result: dict) -> str:
    """The run as Markdown tables: seconds per case against the reference, the stages, the map data types."""
    lines = ["| dataset | shape | reference: pixel, sample s / case | both s / case | both / (pixel + sample) | "
             "both / pixel | peak memory: reference pixel, both | I/O floor s | both / floor |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    stage_lines = ["| dataset | " + " | ".join(STAGES) + " |", "| --- |" + " ---: |" * len(STAGES)]
    dtype_lines = ["| dataset | stored as | write s | MB | pixel AP | AP change |", "| --- | --- |" + " ---: |" * 4]
    for dataset, entry in result["datasets"].items():
        both = next(v for k, v in entry.items() if k.startswith("both_"))
        pixel, sample = entry.get("reference_pixel", {}), entry.get("reference_sample", {})
        lines.append(
            f"| {dataset} | {entry['shape'][0]}^3 | {pixel.get('median_seconds_per_case', '-')}, "
            f"{sample.get('median_seconds_per_case', '-')} | {both['median_seconds_per_case']} | "
            f"{entry.get('both_to_reference_pixel_plus_sample', float('nan')):.2f} | "
            f"{entry.get('both_to_reference_pixel', float('nan')):.2f} | {pixel.get('peak_memory_gb', '-')}, "
            f"{both['peak_memory_gb']} GB | {entry['io_floor_seconds']['total']:.2f} | {both['ratio_to_io']:.1f} |")
        stages = both["median_stage_seconds"]
        stage_lines.append(f"| {dataset} | " + " | ".join(f"{stages.get(s, float('nan')):.1f}" for s in STAGES) + " |")
        for dtype, row in entry.get("map_dtypes", {}).items():
            if isinstance(row, dict):
                dtype_lines.append(f"| {dataset} | {dtype} | {row['write_seconds']:.2f} | {row['megabytes']:.1f} | "
                                   f"{row['pixel_ap']:.6f} | {row['ap_change']:+.1e} |")
    return "\n".join([*lines, "", *stage_lines, "", *dtype_lines])


def main(argv=None) -> dict:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--cases", type=int, default=3, help="toy cases per dataset (half with an anomaly)")
    cli.add_argument("--datasets", nargs="+", default=["brain", "abdom"], choices=("brain", "abdom"))
    cli.add_argument("--size", type=int, default=None, help="cube side (default MOOD's: 256 brain, 512 abdomen)")
    cli.add_argument("--models_dir", type=Path, default=REPO / "bundle" / "models")
    cli.add_argument("--reference", default=DEFAULT_REFERENCE,
                     help="the commit whose bundle is the reference ('none': no reference run)")
    cli.add_argument("--reference_models", default="auto", choices=("auto", "same", "own"),
                     help="the reference runs the same models folder or the one its commit shipped (auto: own "
                          "where --models_dir holds voxel classifiers)")
    cli.add_argument("--model_formats", nargs="+", default=["pytorch"], choices=("pytorch", "torchscript", "onnx"),
                     help="run the ensemble from the state dicts and/or their exports (made here by scripts.export)")
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--json", default=str(REPO / "bench/results/inference.json"))
    args = cli.parse_args(argv)
    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "reference": args.reference,
              "models_dir": str(args.models_dir), "targets": TARGETS, "datasets": {}}
    own = args.reference != "none" and (args.reference_models == "own" or (
        args.reference_models == "auto" and holds_classifiers(args.models_dir, args.datasets)))
    result["reference_models"] = f"{args.reference}:bundle/models" if own else "same"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = work / "models"
        shutil.copytree(args.models_dir, models)
        args.models_dir = models
        exports = [f for f in args.model_formats if f != "pytorch"]
        reference = None if args.reference == "none" else reference_bundle(args.reference, work / "reference_code")
        their_models = reference_models(args.reference, work / "reference_models") if own else None
        for dataset in args.datasets:
            if exports:
                export_dataset(models, dataset, exports, bundle_root=REPO / "bundle")
            result["datasets"][dataset] = bench_dataset(dataset, args, work, reference, their_models)
            print(json.dumps({dataset: result["datasets"][dataset]}, indent=1), flush=True)
    save_json(result, args.json)
    print(tables(result), flush=True)
    return result


if __name__ == "__main__":
    main()
