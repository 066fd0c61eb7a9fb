"""The voxel classifier's study: training variants compared on the synthetic validation of their own folds (each
model fold's held-out tasks), the measure the defaults are chosen on; the toy kinds and the gorilla set only check
the choice afterwards (``bench/bench_quality.py --models NAME=<work_dir>/<variant>/models``).

Run from the repository root::

    PYTHONPATH=bundle:. .venv/bin/python bench/study_classifier.py --dataset brain --data DIR [--foreign DIR]
        [--work_dir outputs/classifier-study] [--json bench/results/classifier_study_brain.json]
        --variants 'default=' 't4=--num_train_tasks 4' 'no_normative=--classifier_features [texture,mirror,position]'

Each variant is ``NAME=<training arguments>`` on top of ``make train DATASET=<dataset> KIND=classifier`` (the
repository's own command, ``python -m scripts.training`` with ``bundle/configs/classifier.yaml``), trained into
``<work_dir>/<dataset>_<NAME>`` without calibration, all variants sharing one cache of preprocessed scans. A
variant whose folder holds a finished ``summary.json`` is read, not retrained (``--retrain`` to train it again).
The table gives, per variant, the mean over the folds of the validation pixel AP (pooled over each fold's held-out
tasks) and sample AP, the trees, the training rows and the wall-clock seconds of the whole run (2 cores: run
nothing else meanwhile). Pooled APs compare variants that share the split and validation samples (the same
``num_train_tasks``); "per held-out task" (each task's pixel AP in the folds that held it out, averaged over the
tasks) also compares variants with other numbers of training tasks.
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
CONFIGS = ["common.yaml", "train.yaml", "{dataset}.yaml", "classifier.yaml"]


def train_variant(dataset: str, data: Path, foreign: Path | None, folder: Path, cache: Path, arguments: str) -> float:
    configs = [str(REPO / "bundle" / "configs" / c.format(dataset=dataset)) for c in CONFIGS]
    command = [sys.executable, "-m", "scripts.training", "--config_file", *configs, "--output_dir", str(folder),
               "--dataset_dir", str(data), "--cache_dir", str(cache), "--no_calibration",
               *(["--foreign_dir", str(foreign)] if foreign else []), *shlex.split(arguments)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "bundle"), str(REPO)]),
           "PYTHONWARNINGS": "ignore:parsing config_file:UserWarning:monai.bundle.scripts"}
    started = time.perf_counter()
    with open(folder.parent / f"{folder.name}.log", "w") as log:
        subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - started


def summarise(folder: Path, dataset: str, only_folds: list[int] | None = None) -> dict:
    ensemble = folder / "models" / dataset
    folds = [json.loads(p.read_text()) for p in sorted(ensemble.glob("fold_*.json"))]
    folds = [f for f in folds if only_folds is None or f["fold"] in only_folds]
    if not folds:
        raise FileNotFoundError(f"no fold records in {ensemble}")

    def mean(key):
        return sum(f[key] for f in folds) / len(folds)

    # per task, the mean pixel AP of the folds that held it out; then their mean: comparable across num_train_tasks
    tasks = sorted({t for f in folds for t in f.get("per_task_pixel_ap", {})})
    by_task = {t: [f["per_task_pixel_ap"][t] for f in folds if t in f.get("per_task_pixel_ap", {})] for t in tasks}
    task_means = {t: sum(v) / len(v) for t, v in by_task.items()}
    return {"folds": len(folds), "pixel_ap": mean("pixel_ap"), "sample_ap": mean("sample_ap"),
            "held_out_task_pixel_ap": task_means,
            "mean_held_out_task_pixel_ap": sum(task_means.values()) / len(task_means) if task_means else None,
            "trees": mean("best_iteration"), "train_rows": mean("train_rows"),
            "fold_seconds": mean("seconds") if not isinstance(folds[0]["seconds"], dict)
            else sum(f["seconds"]["total"] for f in folds) / len(folds),
            "per_fold": [{k: f[k] for k in ("fold", "train_tasks", "val_tasks", "pixel_ap", "sample_ap")}
                         for f in folds]}


def table(result: dict) -> str:
    rows = ["| variant | arguments | val pixel AP | per held-out task | val sample AP | trees | rows | run s |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, v in result["variants"].items():
        per_task = v.get("mean_held_out_task_pixel_ap")
        rows.append(f"| {name} | `{v['arguments'] or '(defaults)'}` | {v['pixel_ap']:.3f} | "
                    f"{'-' if per_task is None else f'{per_task:.3f}'} | {v['sample_ap']:.3f} | {v['trees']:.0f} | "
                    f"{v['train_rows']:.0f} | {v.get('run_seconds') or float('nan'):.0f} |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=["brain", "abdom"])
    parser.add_argument("--data", type=Path, required=True, help="folder of normal training scans")
    parser.add_argument("--foreign", type=Path, default=None, help="the other dataset's normals (poisson_inter)")
    parser.add_argument("--variants", nargs="+", required=True, metavar="NAME=ARGS")
    parser.add_argument("--work_dir", type=Path, default=REPO / "outputs" / "classifier-study")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--summary_folds", type=int, nargs="+", default=None,
                        help="summarise every variant on these model folds only (variants trained with --folds)")
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    result = {"settings": {"dataset": args.dataset, "data": args.data.name, "foreign": bool(args.foreign),
                           "summary_folds": args.summary_folds},
              "variants": {}}
    if args.json and args.json.is_file():
        result["variants"] = json.loads(args.json.read_text()).get("variants", {})
    for entry in args.variants:
        name, sep, arguments = entry.partition("=")
        if not name or not sep:
            parser.error(f"a variant is NAME=ARGS, got {entry!r}")
        folder = args.work_dir / f"{args.dataset}_{name}"
        seconds = None
        if args.retrain or not (folder / "models" / args.dataset / "summary.json").is_file():
            seconds = train_variant(args.dataset, args.data.resolve(), args.foreign and args.foreign.resolve(), folder,
                                    args.work_dir / "cache", arguments)
        earlier = result["variants"].get(name, {})
        result["variants"][name] = {"arguments": arguments, **summarise(folder, args.dataset, args.summary_folds),
                                    "run_seconds": seconds if seconds is not None else earlier.get("run_seconds")}
        print(f"{name}: pixel AP {result['variants'][name]['pixel_ap']:.3f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    print(table(result))
    return result


if __name__ == "__main__":
    main()
