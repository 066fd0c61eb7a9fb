"""The slice-wise FPI system against the 3D default at the same CPU budget, on the same normals and held-out cases.

Run from the repository root (``make bench-slicewise``)::

    PYTHONPATH=bundle:. .venv/bin/python bench/bench_slicewise.py [--datasets brain abdom] [--budget 8]
        [--train 20] [--size 256] [--cases 20] [--gorilla 6] [--work_dir outputs/bench-slicewise] [--json PATH]

For each dataset:

1. ``--train`` toy normals at ``--size``^3 (``tools.toy_data``, seed 0, what the shipped models' recipe uses), the
   other dataset's normals as the foreign set (all five paper tasks);
2. both kinds trained by ``scripts.training`` at once, every fold of the split, each fold given ``--budget``
   minutes (``--time_budget``: the cosine spans it), the CPU cores split evenly between the two (so both see the
   same machine, whatever else runs): the 3D default (``train.yaml`` + the dataset overlay, its 128^3 grid) and the
   slice-wise model (``slicewise.yaml``: a 2D network on 256^2 axial slices). Validation as both would be run on a
   CPU: ``--max_val_samples`` samples every second epoch and after the last; no operating points (their
   measurement is an ensemble pass over every normal, longer than the training here);
3. ``bench/bench_quality.py --models 3d=... 2d=...``: the same held-out toy and gorilla cases (seed 2026) through
   the MOOD run script's body for each, scored with MOOD's semantics, with the seconds per case.

The JSON (default ``bench/results/slicewise.json``) holds the training records (best validation AP per fold,
epochs, seconds) and bench-quality's result; the tables are printed last. Generated data and models stay in
``--work_dir`` (never committed).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))
sys.path.insert(1, str(REPO / "bench"))
sys.path.insert(2, str(REPO))

import bench_quality  # noqa: E402

from scripts.io.files import load_json, save_json  # noqa: E402
from tools.toy_data import VARIABILITIES  # noqa: E402

KINDS = {"3d": (), "2d": ("slicewise.yaml",)}  # overlays after the dataset's


def write_normals(data_dir: Path, datasets, n_train: int, size: int, variability: str = "cohort") -> None:
    missing = [d for d in datasets if len(list((data_dir / d / f"{d}_train").glob("*.nii.gz"))) < n_train]
    if missing:
        subprocess.run([sys.executable, "-m", "tools.toy_data", "--output_dir", str(data_dir), "--datasets", *missing,
                        "--size", str(size), "--train", str(n_train), "--toy", "0", "--seed", "0",
                        "--variability", variability], cwd=REPO,
                       check=True)


def training_command(dataset: str, kind: str, data_dir: Path, foreign: str, run_dir: Path, budget: float,
                     max_val_samples: int, extra: list[str] = ()) -> list[str]:
    configs = [str(REPO / "bundle" / "configs" / name)
               for name in ("common.yaml", "train.yaml", f"{dataset}.yaml", *KINDS[kind])]
    return [sys.executable, "-m", "scripts.training", "--config_file", *configs, "--output_dir", str(run_dir),
            "--dataset_dir", str(data_dir / dataset / f"{dataset}_train"),
            "--foreign_dir", str(data_dir / foreign / f"{foreign}_train"), "--no_calibration",
            "--time_budget", str(budget), "--max_epochs", "1000", "--early_stop_patience", "1000",
            "--val_interval", "2", "--val_at_start", "False", "--max_val_samples", str(max_val_samples),
            "--num_workers", "1", "--seed", "0", *extra]


def train_kinds(dataset: str, data_dir: Path, foreign: str, work_dir: Path, budget: float,
                max_val_samples: int, extra: list[str] = ()) -> dict:
    """Both kinds at once, the cores split between them; returns each kind's run folder, seconds and folds."""
    threads = max(1, (os.cpu_count() or 2) // len(KINDS))
    env = dict(os.environ, PYTHONPATH=str(REPO / "bundle"), OMP_NUM_THREADS=str(threads),
               PYTHONWARNINGS="ignore:parsing config_file:UserWarning:monai.bundle.scripts")
    processes, started = {}, time.perf_counter()
    for kind in KINDS:
        run_dir = work_dir / "runs" / dataset / kind
        log = (work_dir / "runs" / f"{dataset}_{kind}.log").open("w")
        command = training_command(dataset, kind, data_dir, foreign, run_dir, budget, max_val_samples, extra)
        processes[kind] = (subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT),
                           run_dir, log)
    out = {}
    for kind, (process, run_dir, log) in processes.items():
        if process.wait() != 0:
            raise RuntimeError(f"training {dataset} {kind} failed ({process.returncode}): see {log.name}")
        log.close()
        folds = [load_json(p) for p in sorted((run_dir / "models" / dataset).glob("fold_*.json"))]
        out[kind] = {"models_dir": str(run_dir / "models"), "seconds": time.perf_counter() - started,
                     "threads": threads,
                     "folds": [{k: f.get(k) for k in ("fold", "train_tasks", "best_metric", "best_metric_epoch",
                                                       "parameters", "training")} for f in folds]}
    return out


def table(training: dict) -> str:
    lines = ["| dataset | kind | parameters | folds | mean best validation pixel AP | epochs per fold |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for dataset, kinds in training.items():
        for kind, entry in kinds.items():
            folds = entry["folds"]
            best = [f["best_metric"] for f in folds if f.get("best_metric") is not None]
            epochs = ", ".join(str((f.get("training") or {}).get("epochs")) for f in folds)
            if not best:
                lines.append(f"| {dataset} | {kind} | - | 0 | - | - |")
                continue
            lines.append(f"| {dataset} | {kind} | {folds[0].get('parameters')} | {len(folds)} | "
                         f"{sum(best) / len(best):.3f} | {epochs} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=bench_quality.DATASETS, default=list(bench_quality.DATASETS))
    parser.add_argument("--budget", type=float, default=8.0, help="minutes per fold, each kind")
    parser.add_argument("--train", type=int, default=20, help="toy normals per dataset")
    parser.add_argument("--size", type=int, default=256, help="cube side of the normals and the cases")
    parser.add_argument("--max_val_samples", type=int, default=8)
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--gorilla", type=int, default=6)
    parser.add_argument("--conventions", nargs="+", choices=bench_quality.CONVENTIONS, default=["mood"])
    parser.add_argument("--variability", choices=VARIABILITIES, default="cohort",
                        help="how the toy subjects (normals and scored cases) differ (tools.toy_data)")
    parser.add_argument("--work_dir", type=Path, default=REPO / "outputs" / "bench-slicewise")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "slicewise.json")
    parser.add_argument("--skip_training", action="store_true", help="score the models an earlier run trained")
    parser.add_argument("--train_args", default="", help="further training settings of both kinds, e.g. "
                        "\"--spatial_size [32,32,32] --network_depth 3\" (the tests' tiny models)")
    args = parser.parse_args(argv)
    work_dir = args.work_dir.resolve()
    data_dir = work_dir / f"data_{args.variability}"
    (work_dir / "runs").mkdir(parents=True, exist_ok=True)
    # each dataset's normals are the other's foreign set
    write_normals(data_dir, list(bench_quality.DATASETS), args.train, args.size, args.variability)
    training = {}
    for dataset in args.datasets:
        foreign = next(d for d in bench_quality.DATASETS if d != dataset)
        if args.skip_training and args.json.is_file():
            training[dataset] = load_json(args.json)["training"][dataset]
        else:
            training[dataset] = train_kinds(dataset, data_dir, foreign, work_dir, args.budget, args.max_val_samples,
                                            shlex.split(args.train_args))
        print(f"{dataset}: trained in {max(k['seconds'] for k in training[dataset].values()):.0f} s", flush=True)
    quality = {}
    for dataset in args.datasets:
        models = [f"{kind}={entry['models_dir']}" for kind, entry in training[dataset].items()]
        quality_json = work_dir / f"quality_{dataset}.json"
        quality[dataset] = bench_quality.main(
            ["--models", *models, "--datasets", dataset, "--size", str(args.size), "--cases", str(args.cases),
             "--gorilla", str(args.gorilla), "--conventions", *args.conventions, "--variability", args.variability,
             "--work_dir", str(work_dir / "quality"), "--json", str(quality_json)])
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "training": training, "quality": quality}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    save_json(result, args.json)
    print(table(training))
    for dataset, entry in quality.items():
        print(json.dumps({dataset: entry["datasets"][dataset].get("seconds_per_case")}))
    print(f"json: {args.json}")
    return result


if __name__ == "__main__":
    main()
