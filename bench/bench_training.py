"""Training throughput of the bundle's own training config: samples per second and data-loader wait.

Run from the repository root::

    PYTHONPATH=bundle .venv/bin/python bench/bench_training.py [--dataset_dir DIR] [--spatial_size 64]
        [--iterations 24] [--batch_size 2] [--num_workers 1] [--variants fp32 bf16 fp32_cl bf16_cl]
        [--repeats 1] [--json PATH]

Builds the trainer from ``bundle/configs/train.yaml`` + ``brain.yaml`` (validation and logging handlers
off) and times every iteration with Ignite's events: the wait for the next batch (GET_BATCH_STARTED to
GET_BATCH_COMPLETED) and the whole iteration. Without ``--dataset_dir`` it writes 20 toy normal brains
(``tools.phantoms``) to a temporary folder first. The first iterations (cache filling, warm-up) are
excluded from the medians. ``--variants`` are the training settings compared in the same run, in turn,
``--repeats`` times: ``fp32`` (the default), ``bf16`` (``precision bf16``: CPU bfloat16 autocast), ``*_cl``
(``channels_last true``); each variant's samples per second is the median over its iterations of every repeat,
and its ratio to the first variant's is reported. Writes JSON (default ``bench/results/training.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from ignite.engine import Events

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))
sys.path.insert(1, str(REPO))  # the tools (tools.phantoms)

from monai.bundle import ConfigParser  # noqa: E402

from scripts.io.files import bundle_configs, save_json  # noqa: E402
from tools.phantoms import write_normal_scans  # noqa: E402

# the settings of each variant (train.yaml's knobs)
VARIANTS = {f"{precision}{suffix}": {"precision": precision, "channels_last": bool(suffix)}
            for suffix in ("", "_cl") for precision in ("fp32", "bf16")}


def build_trainer(dataset_dir: str, work: Path, args, variant: str = "fp32") -> tuple:
    parser = ConfigParser()
    parser.read_config(bundle_configs(REPO / "bundle", "train", "brain"))
    parser.update({
        "bundle_root": str(REPO / "bundle"),
        "dataset_dir": dataset_dir,
        "output_dir": str(work / "run"),
        "cache_dir": str(work / "cache"),
        "spatial_size": [args.spatial_size] * 3,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "max_epochs": 1000,
        "train#handlers": [],
        **VARIANTS[variant],
    })
    parser.parse()
    for i in range(len(parser["initialize"])):
        parser.get_parsed_content(f"initialize#{i}")  # determinism and the run folder, as the bundle does
    return parser.get_parsed_content("train#trainer"), parser.get_parsed_content("train#dataset")


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def time_iterations(dataset_dir: str, work: Path, args, variant: str) -> tuple[list[float], list[float], str]:
    """The loader waits and iteration times of one variant after its warm-up (the cache is shared)."""
    trainer, dataset = build_trainer(dataset_dir, work, args, variant)
    for i in range(len(dataset.scans)):  # fill the cache first: decoding is not training throughput
        dataset.scans[i]
    marks: dict[str, float] = {}
    waits, totals = [], []
    trainer.add_event_handler(Events.GET_BATCH_STARTED, lambda e: marks.__setitem__("get", time.perf_counter()))
    trainer.add_event_handler(Events.GET_BATCH_COMPLETED, lambda e: waits.append(time.perf_counter() - marks["get"]))
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: marks.__setitem__("it", time.perf_counter()))

    def done(engine):
        totals.append(time.perf_counter() - marks["it"] + waits[-1])
        if len(totals) >= args.warmup + args.iterations:
            engine.terminate()

    trainer.add_event_handler(Events.ITERATION_COMPLETED, done)
    trainer.run()
    return waits[args.warmup:len(totals)], totals[args.warmup:], str(trainer.state.device)


def main(argv=None) -> dict:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--dataset_dir", default=None)
    cli.add_argument("--spatial_size", type=int, default=64)
    cli.add_argument("--iterations", type=int, default=24)
    cli.add_argument("--warmup", type=int, default=4)
    cli.add_argument("--batch_size", type=int, default=2)
    cli.add_argument("--num_workers", type=int, default=1)
    cli.add_argument("--variants", nargs="+", default=["fp32"], help=f"settings compared in turn: {list(VARIANTS)}")
    cli.add_argument("--repeats", type=int, default=1, help="rounds over the variants")
    cli.add_argument("--json", default=str(REPO / "bench/results/training.json"))
    args = cli.parse_args(argv)

    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        cli.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    waits = {v: [] for v in args.variants}
    totals = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dataset_dir = args.dataset_dir
        if dataset_dir is None:
            dataset_dir = str(work / "normals")
            write_normal_scans(dataset_dir, "brain", count=20, size=2 * args.spatial_size)
        for _ in range(args.repeats):
            for variant in args.variants:
                wait, total, device = time_iterations(dataset_dir, work, args, variant)
                waits[variant] += wait
                totals[variant] += total

    variants = {}
    for variant in args.variants:
        step = statistics.median(totals[variant])
        variants[variant] = {**VARIANTS[variant], "iterations": len(totals[variant]), "median_iteration_s": step,
                             "samples_per_s": args.batch_size / step,
                             "median_loader_wait_s": statistics.median(waits[variant]),
                             "loader_wait_fraction": sum(waits[variant]) / sum(totals[variant])}
    reference = variants[args.variants[0]]["samples_per_s"]
    for entry in variants.values():
        entry["speed_vs_first"] = entry["samples_per_s"] / reference
    first = variants[args.variants[0]]
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_bf16": "avx512_bf16" in _cpu_flags() or "amx_bf16" in _cpu_flags(),
        "spatial_size": args.spatial_size,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "repeats": args.repeats,
        # the first variant's numbers, under the names of the single-variant runs before
        **{k: first[k] for k in ("iterations", "median_iteration_s", "samples_per_s", "median_loader_wait_s",
                                 "loader_wait_fraction")},
        "variants": variants,
    }
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(result, indent=1))
    save_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
