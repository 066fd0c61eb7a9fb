"""A recipe study at an equal compute budget: which training settings learn fastest.

Run from the repository root::

    PYTHONPATH=bundle:. .venv/bin/python bench/study_recipe.py [--budget 3] [--size 64] [--data_size 128] \
        [--datasets brain abdom] [--settings baseline tasks_2 ...] [--no_check]

For every dataset and setting, one model fold (fold 0 of its split) is trained with the bundle's own training
command (``python -m scripts.training``) under ``--time_budget`` minutes, on toy normals made with seed 0 at
``--data_size``^3 (default ``--size``) with a working grid of ``--size``^3 (the toy scans resampled to it). What
chooses is the fold's best
synthetic validation result (held-out tasks on the held-out data fold: the paper's principle). What checks
is ``bench/bench_quality.py`` at the data's size on its held-out toy kinds and gorilla set (seed 2026), through
the four MOOD run scripts with ``MOOD_ALLOW_PARTIAL_ENSEMBLE=1`` (one fold, not the ensemble). The table
goes to stdout and the JSON to ``bench/results/recipe_study.json``; ``--from_json`` prints an earlier one.

Settings differ from ``baseline`` (the defaults of ``configs/train.yaml``) in one knob each; ``patches`` trains
on the data's own grid (``--data_size``^3) in ``--size``^3 crops and sees whole scans in one pass
(``patches_windows``: in sliding windows of the crop size), so each training step costs what a baseline step costs
while the network sees voxels at their native size. Validation sets
differ with the number of training tasks (1 task: 4 held-out tasks; 2: 3; 4: 1), so compare those on the
check sets too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))
sys.path.insert(1, str(REPO))
sys.path.insert(2, str(REPO / "bench"))

import bench_quality  # noqa: E402

from scripts.io.files import save_json  # noqa: E402
from tools.toy_data import DATASETS, VARIABILITIES, write_toy_dataset  # noqa: E402

# one knob each against the defaults of train.yaml (when the study of
# bundle/docs/experiments/2026-12-01-recipe-equal-budget.md ran: MSE; BCE won and is the default since, so `mse` is
# now the other side of that comparison)
SETTINGS = {
    "baseline": [],
    "tasks_2": ["--num_train_tasks", "2"],
    "tasks_4": ["--num_train_tasks", "4"],
    "filters_16": ["--network_base_filters", "16"],
    "filters_32": ["--network_base_filters", "32"],
    "anomalies_1": ["--max_anomalies", "1"],
    "mse": ["--loss", "mse"],
    "lr_3e-3": ["--learning_rate", "0.003"],
    "lr_3e-4": ["--learning_rate", "0.0003"],
    # cubes of the study's --data_size and --size
    "patches": {"spatial_size": "data_size", "patch_size": "size"},
    "patches_windows": {"spatial_size": "data_size", "patch_size": "size", "sliding_window": "True"},
}


def setting_arguments(setting: str, size: int, data_size: int) -> list[str]:
    """The setting's training arguments (sizes of ``patches`` filled in)."""
    knobs = SETTINGS[setting]
    if isinstance(knobs, list):
        return knobs
    sides = {"size": size, "data_size": data_size}
    return [item for key, value in knobs.items()
            for item in (f"--{key}", json.dumps([sides[value]] * 3) if value in sides else value)]


def best_validation(run_dir: Path, record: dict) -> dict:
    """The validation of the best epoch (the checkpoint's) from the run's ``metrics.json``."""
    validations = json.loads((run_dir / "metrics.json").read_text())
    best = [v for v in validations if v["epoch"] == record["best_metric_epoch"]]
    return {"start_pixel_ap": validations[0]["pixel_ap"], **(best[-1] if best else {})}


def train_setting(dataset: str, setting: str, data_dir: Path, work_dir: Path, size: int, budget: float,
                  cache_dir: Path, data_size: int | None = None, val_interval: int = 2) -> dict:
    """Train fold 0 of one setting under the budget; return its fold record and its best validation."""
    other = "abdom" if dataset == "brain" else "brain"
    run_dir = work_dir / dataset / setting
    record_path = run_dir / "models" / dataset / "fold_0.json"
    if record_path.is_file():  # done by an earlier, interrupted study
        record = json.loads(record_path.read_text())
        return {"fold": record, "best": best_validation(run_dir, record)}
    knobs = {"--spatial_size": json.dumps([size] * 3), "--time_budget": str(budget), "--max_epochs": "10000",
             "--early_stop_patience": "10000", "--val_interval": str(val_interval), "--num_workers": "1",
             "--seed": "0", "--cache_dir": str(cache_dir)}
    arguments = setting_arguments(setting, size, data_size or size)
    knobs.update(zip(arguments[::2], arguments[1::2]))  # the setting's knob replaces the study's default
    command = [sys.executable, "-m", "scripts.training", "--config_file",
               *(str(REPO / "bundle" / "configs" / f) for f in ("common.yaml", "train.yaml", f"{dataset}.yaml")),
               "--output_dir", str(run_dir), "--folds", "0",
               "--dataset_dir", str(data_dir / dataset / f"{dataset}_train"),
               "--foreign_dir", str(data_dir / other / f"{other}_train"),
               *(item for pair in knobs.items() for item in pair)]
    env = dict(os.environ, PYTHONPATH=str(REPO / "bundle"))
    log = run_dir / "study.log"
    run_dir.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        result = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{dataset}/{setting}: training failed ({result.returncode}), see {log}")
    record = json.loads(record_path.read_text())
    return {"fold": record, "best": best_validation(run_dir, record)}


def check_setting(dataset: str, models_dir: Path, work_dir: Path, size: int, variability: str = "cohort") -> dict:
    """bench_quality on the held-out toy kinds and gorilla set at the study's size, one fold."""
    os.environ["MOOD_ALLOW_PARTIAL_ENSEMBLE"] = "1"
    result = bench_quality.run(models_dir, work_dir, [dataset], size, n_cases=10, n_gorilla=4, n_train=6,
                               conventions=["mood"], seed=2026, variability=variability)
    methods = result["datasets"][dataset]["methods"]
    return {method: {group: {k: scored[group][k] for k in ("pixel_ap", "sample_ap")}
                     for group in ("toy", "gorilla")} for method, scored in methods.items()}


def table(study: dict) -> str:
    lines = ["| dataset | setting | epochs (s) | val pixel AP | val sample AP | toy pixel / sample AP | "
             "gorilla pixel / sample AP |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]

    def fmt(value):
        return "-" if value is None else f"{value:.3f}"

    for dataset, settings in study["datasets"].items():
        for setting, entry in settings.items():
            check = entry.get("check", {}).get("bundle_mood", {})
            best, training = entry["record"]["best"], entry["record"]["fold"].get("training", {})
            toy, gorilla = check.get("toy", {}), check.get("gorilla", {})
            lines.append(
                f"| {dataset} | {setting} | {training.get('epochs', '-')} ({training.get('seconds', 0):.0f}) | "
                f"{fmt(best.get('pixel_ap'))} | {fmt(best.get('sample_ap'))} | "
                f"{fmt(toy.get('pixel_ap'))} / {fmt(toy.get('sample_ap'))} | "
                f"{fmt(gorilla.get('pixel_ap'))} / {fmt(gorilla.get('sample_ap'))} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--budget", type=float, default=3.0, help="minutes per setting and dataset")
    parser.add_argument("--size", type=int, default=64, help="cube side of the working grid (patches: of the crops)")
    parser.add_argument("--data_size", type=int, default=None,
                        help="cube side of the toy scans and of the check sets (default: --size)")
    parser.add_argument("--val_interval", type=int, default=2, help="validate every N epochs")
    parser.add_argument("--train", type=int, default=20, help="toy normals per dataset (seed 0)")
    parser.add_argument("--no_check", action="store_true", help="synthetic validation only")
    parser.add_argument("--variability", choices=VARIABILITIES, default="cohort",
                        help="how the toy subjects (normals and checked cases) differ (tools.toy_data)")
    parser.add_argument("--work_dir", type=Path, default=REPO / "outputs" / "recipe-study")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "recipe_study.json")
    parser.add_argument("--from_json", type=Path, default=None, help="print the table of an earlier study")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        study = json.loads(args.from_json.read_text())
        print(table(study))
        return study
    data_size = args.data_size or args.size
    data_dir = args.work_dir.resolve() / f"data_{data_size}cubed_{args.variability}"
    # the runs of this budget and these sizes
    work_dir = args.work_dir.resolve() / (f"{args.size}cubed_{args.budget:g}min" if data_size == args.size
                                          else f"{data_size}data_{args.size}cubed_{args.budget:g}min")
    for dataset in DATASETS:  # both: each is the other's foreign scans (poisson_inter)
        if not (data_dir / dataset / f"{dataset}_train").is_dir():
            write_toy_dataset(data_dir, dataset, n_train=args.train, n_toy=0, size=data_size, seed=0,
                              variability=args.variability)
    settings = {"budget": args.budget, "size": args.size, "data_size": data_size, "val_interval": args.val_interval,
                "train": args.train, "fold": 0, "variability": args.variability}
    study = json.loads(args.json.read_text()) if args.json.is_file() else {}
    if {**settings, **study.get("settings", {})} != settings:  # another study's file: start afresh
        study = {}
    study.setdefault("settings", settings)
    study.setdefault("datasets", {})
    chosen = list(args.settings)
    for patches in ("patches", "patches_windows"):
        if patches in chosen and data_size == args.size:
            chosen.remove(patches)  # the crop would be the whole grid: the baseline again
            print(f"{patches} skipped: it needs --data_size larger than --size (e.g. --size 64 --data_size 128)")
    for dataset in args.datasets:
        for setting in chosen:
            started = time.perf_counter()
            entry = {"record": train_setting(dataset, setting, data_dir, work_dir, args.size, args.budget,
                                             work_dir / "cache", data_size, args.val_interval)}
            if not args.no_check:
                entry["check"] = check_setting(dataset, work_dir / dataset / setting / "models",
                                               work_dir / "check" / dataset / setting, data_size, args.variability)
            study["datasets"].setdefault(dataset, {})[setting] = entry
            args.json.parent.mkdir(parents=True, exist_ok=True)
            save_json(study, args.json)  # after every setting: an interrupted study keeps what it has
            print(f"{dataset}/{setting}: {time.perf_counter() - started:.0f} s", flush=True)
    print(table(study))
    return study


if __name__ == "__main__":
    main()
