"""Training throughput of the bundle's own training config: samples per second and data-loader wait.

Run from the repository root::

    PYTHONPATH=bundle .venv/bin/python bench/bench_training.py [--dataset_dir DIR] [--spatial_size 64]
        [--iterations 24] [--batch_size 2] [--num_workers 1] [--json PATH]

Builds the trainer from ``bundle/configs/train.yaml`` + ``brain.yaml`` (validation and logging handlers
off) and times every iteration with Ignite's events: the wait for the next batch (GET_BATCH_STARTED to
GET_BATCH_COMPLETED) and the whole iteration. Without ``--dataset_dir`` it writes 20 toy normal brains
(``tools.phantoms``) to a temporary folder first. The first iterations (cache filling, warm-up) are
excluded from the medians. Writes JSON (default ``bench/results/training.json``).
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


def build_trainer(dataset_dir: str, work: Path, args) -> tuple:
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
    })
    parser.parse()
    for i in range(len(parser["initialize"])):
        parser.get_parsed_content(f"initialize#{i}")  # determinism and the run folder, as the bundle does
    return parser.get_parsed_content("train#trainer"), parser.get_parsed_content("train#dataset")


def main(argv=None) -> dict:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--dataset_dir", default=None)
    cli.add_argument("--spatial_size", type=int, default=64)
    cli.add_argument("--iterations", type=int, default=24)
    cli.add_argument("--warmup", type=int, default=4)
    cli.add_argument("--batch_size", type=int, default=2)
    cli.add_argument("--num_workers", type=int, default=1)
    cli.add_argument("--json", default=str(REPO / "bench/results/training.json"))
    args = cli.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dataset_dir = args.dataset_dir
        if dataset_dir is None:
            dataset_dir = str(work / "normals")
            write_normal_scans(dataset_dir, "brain", count=20, size=2 * args.spatial_size)
        trainer, dataset = build_trainer(dataset_dir, work, args)
        for i in range(len(dataset.scans)):  # fill the cache first: decoding is not training throughput
            dataset.scans[i]
        marks: dict[str, float] = {}
        waits, totals = [], []
        trainer.add_event_handler(Events.GET_BATCH_STARTED, lambda e: marks.__setitem__("get", time.perf_counter()))
        trainer.add_event_handler(Events.GET_BATCH_COMPLETED,
                                  lambda e: waits.append(time.perf_counter() - marks["get"]))
        trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: marks.__setitem__("it", time.perf_counter()))

        def done(engine):
            totals.append(time.perf_counter() - marks["it"] + waits[-1])
            if len(totals) >= args.warmup + args.iterations:
                engine.terminate()

        trainer.add_event_handler(Events.ITERATION_COMPLETED, done)
        trainer.run()

    waits, totals = waits[args.warmup:len(totals)], totals[args.warmup:]
    step = statistics.median(totals)
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(trainer.state.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "spatial_size": args.spatial_size,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "iterations": len(totals),
        "median_iteration_s": step,
        "samples_per_s": args.batch_size / step,
        "median_loader_wait_s": statistics.median(waits),
        "loader_wait_fraction": sum(waits) / sum(totals),
    }
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(result, indent=1))
    save_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
