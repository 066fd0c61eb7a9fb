"""Helpers the training config calls: cache and output folders, the per-fold record, and running all
model folds of a cross-validation split one after another (or spread over the GPUs)."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from scripts.data import CrossValidationSplit, model_folds
from scripts.files import save_json

__all__ = [
    "cache_folder", "cached_scans", "check_output_dir", "save_fold_result", "save_training_settings", "train_folds"
]

logger = logging.getLogger(__name__)


def cache_folder(cache_dir: str | Path, dataset_dir: str | Path) -> str:
    """Where the decoded, resampled scans of ``dataset_dir`` are cached: one subfolder per dataset folder.
    (MONAI's PersistentDataset also keys each file by its path and the preprocessing's hash.)"""
    key = hashlib.sha1(str(Path(dataset_dir).resolve()).encode()).hexdigest()[:16]
    return str(Path(cache_dir) / f"{Path(dataset_dir).name}-{key}")


def cached_scans(scans, preprocessing, cache_dir: str | Path, dataset_dir: str | Path):
    """The preprocessed ``scans`` (paths) as a MONAI PersistentDataset: decoded and resampled once, then read
    back from ``cache_dir``; the key includes the preprocessing, so changing it (e.g. ``spatial_size``)
    never reuses stale volumes."""
    from monai.data import PersistentDataset
    from monai.data.utils import json_hashing

    return PersistentDataset([{"image": s} for s in scans], transform=preprocessing,
                             cache_dir=cache_folder(cache_dir, dataset_dir), hash_transform=json_hashing)


def check_output_dir(output_dir: str | Path, bundle_root: str | Path) -> None:
    """Create the run folder; say so loudly when it is the bundle itself (shipped weights get replaced)."""
    output = Path(output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    if output == Path(bundle_root).resolve():
        logger.warning("output_dir is the bundle root: this run replaces the shipped weights in %s/models", output)


def save_training_settings(model_dir, fold: int, split: CrossValidationSplit, fingerprint: dict | None,
                           spatial_size, normalisation: str, network_def) -> None:
    """What inference and later readers need to know about this fold, written before training starts."""
    model_dir = Path(model_dir)
    if fingerprint is not None:
        save_json(fingerprint, model_dir / "fingerprint.json")
    record = {
        "fold": fold,
        "split": {k: list(v) if isinstance(v, tuple) else v for k, v in split.__dict__.items()},
        "spatial_size": list(spatial_size),
        "normalisation": normalisation,
        "network": type(network_def).__name__,
        "parameters": sum(p.numel() for p in network_def.parameters()),
    }
    save_json(record, model_dir / f"fold_{fold}.json")


def save_fold_result(model_dir, fold: int, split: CrossValidationSplit, evaluator, key_metric: str) -> dict:
    """Add the best validation result of the run to ``fold_<k>.json``."""
    path = Path(model_dir) / f"fold_{fold}.json"
    record = json.loads(path.read_text()) if path.is_file() else {"fold": fold}
    record.update({
        "key_metric": key_metric,
        "best_metric": float(evaluator.state.best_metric),
        "best_metric_epoch": int(evaluator.state.best_metric_epoch),
        "train_tasks": list(split.train_tasks),
        "val_tasks": list(split.val_tasks),
        "checkpoint": f"fold_{fold}.pt",
    })
    save_json(record, path)
    return record


def _fold_command(fold: int, config_files: list[str], overrides: list[str], bundle_root: str) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--meta_file", str(Path(bundle_root) / "configs" / "metadata.json"),
        "--bundle_root", bundle_root,
        "--config_file", repr(config_files),
        "--fold", str(fold),
        *overrides,
    ]


def train_folds(config_files: list[str], output_dir: str, num_train_tasks: int = 1, dataset: str | None = None,
                overrides: list[str] | None = None, bundle_root: str = "bundle", gpus: int | None = None,
                folds: list[int] | None = None) -> dict:
    """Train every model fold of a split (one process per fold, spread over the GPUs when there are
    several) and write ``<output_dir>/models/<dataset>/summary.json`` with each fold's validation result."""
    overrides = list(overrides or []) + ["--output_dir", output_dir, "--num_train_tasks", str(num_train_tasks)]
    folds = list(range(len(model_folds(num_train_tasks)))) if folds is None else folds
    gpus = torch.cuda.device_count() if gpus is None else gpus
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(bundle_root).resolve()), env.get("PYTHONPATH")]))

    def run(position: int) -> tuple[int, int, float]:
        fold = folds[position]
        fold_env = dict(env)
        if gpus > 1:
            fold_env["CUDA_VISIBLE_DEVICES"] = str(position % gpus)
        start = time.perf_counter()
        logger.info("training fold %d", fold)
        code = subprocess.call(_fold_command(fold, config_files, overrides, bundle_root), env=fold_env)
        return fold, code, time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=max(1, gpus)) as pool:
        outcomes = list(pool.map(run, range(len(folds))))
    failed = [fold for fold, code, _ in outcomes if code != 0]
    dataset = dataset or _dataset_of(config_files)
    model_dir = Path(output_dir) / "models" / dataset
    records = []
    for fold, code, seconds in outcomes:
        path = model_dir / f"fold_{fold}.json"
        record = json.loads(path.read_text()) if path.is_file() else {"fold": fold}
        records.append({**record, "exit_code": code, "seconds": round(seconds, 1)})
    finished = [r["best_metric"] for r in records if r.get("exit_code") == 0 and "best_metric" in r]
    summary = {
        "dataset": dataset,
        "num_train_tasks": num_train_tasks,
        "folds": records,
        "failed_folds": failed,
        "mean_best_metric": sum(finished) / len(finished) if finished else None,
    }
    save_json(summary, model_dir / "summary.json")
    if failed:
        raise RuntimeError(f"folds {failed} failed; see the logs above and {model_dir / 'summary.json'}")
    return summary


def _dataset_of(config_files: list[str]) -> str:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_files)
    return str(parser["dataset"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Train all model folds of a cross-validation split.")
    parser.add_argument("--config_file", nargs="+", required=True, help="train.yaml and a dataset overlay")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_train_tasks", type=int, default=1)
    parser.add_argument("--folds", type=int, nargs="*", default=None, help="default: all folds of the split")
    parser.add_argument("--bundle_root", default="bundle")
    parser.add_argument("--gpus", type=int, default=None, help="default: all visible GPUs")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    summary = train_folds(args.config_file, args.output_dir, args.num_train_tasks, overrides=overrides,
                          bundle_root=args.bundle_root, gpus=args.gpus, folds=args.folds)
    print(json.dumps({k: v for k, v in summary.items() if k != "folds"}, indent=1))
    return summary


if __name__ == "__main__":
    main()
