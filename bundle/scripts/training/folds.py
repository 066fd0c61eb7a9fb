"""Helpers the training config calls: the argument checks, the cache of preprocessed scans, the per-fold record,
and running all model folds of a cross-validation split one after another (or spread over the GPUs), with the
plan written once before they start."""

from __future__ import annotations

import argparse
import functools
import hashlib
import inspect
import json
import logging
import os
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from pathlib import Path

import fire.parser
import numpy as np
import torch
from monai.data.utils import json_hashing

from scripts import MONAI_CONFIG_NOTICE_FILTER
from scripts.calibration import calibrate_training_run
from scripts.cli import describe_error
from scripts.data.splits import CrossValidationSplit, model_folds
from scripts.inference.ensemble import load_weights
from scripts.io.files import save_json
from scripts.plans import load_plan, record_classifier_files

__all__ = ["cache_folder", "cached_scans", "check_arguments", "initial_weights", "preprocessing_hashing",
           "save_fold_result", "train_folds"]

logger = logging.getLogger(__name__)


def cache_folder(cache_dir: str | Path, dataset_dir: str | Path) -> str:
    """Where the decoded, resampled scans of ``dataset_dir`` are cached: one subfolder per dataset folder.
    (MONAI's PersistentDataset also keys each file by its path and the preprocessing's hash.)"""
    key = hashlib.sha1(str(Path(dataset_dir).resolve()).encode()).hexdigest()[:16]
    return str(Path(cache_dir) / f"{Path(dataset_dir).name}-{key}")


_MAX_DEPTH = 12  # deep enough for a reader inside a list inside LoadImaged; a guard against runaway structures


def _type_name(value) -> str:
    kind = value if isinstance(value, type) else type(value)
    return f"{getattr(kind, '__module__', '')}.{getattr(kind, '__qualname__', kind.__name__)}"


def _code_digest(code: types.CodeType) -> str:
    """A function's code, as bytecode and constants (nested code objects by their own digest, never their repr)."""
    digest = hashlib.sha256(code.co_code)
    for constant in code.co_consts:
        digest.update((_code_digest(constant) if isinstance(constant, types.CodeType)
                       else json.dumps(_described(constant), sort_keys=True)).encode())
    return digest.hexdigest()


def _described(value, seen: frozenset = frozenset(), depth: int = 0):
    """A JSON-able description of a transform's settings: plain values as they are, arrays by dtype, shape and
    digest, functions by name and code, objects by class and attributes; never an object's repr or id (they change
    per process)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return _described(value.item(), seen, depth)
    if isinstance(value, Enum):
        return _described(value.value, seen, depth)
    if isinstance(value, (Path, torch.device, torch.dtype, np.dtype)):
        return str(value)
    if isinstance(value, slice):
        return {"slice": [_described(v, seen, depth) for v in (value.start, value.stop, value.step)]}
    if isinstance(value, (torch.Tensor, np.ndarray)):
        tensor = torch.as_tensor(value).detach().cpu().contiguous().reshape(-1)
        return {"dtype": str(tensor.dtype), "shape": list(value.shape),
                "sha256": hashlib.sha256(tensor.view(torch.uint8).numpy().tobytes()).hexdigest()}
    if isinstance(value, type):
        return _type_name(value)
    if id(value) in seen or depth >= _MAX_DEPTH:  # a cycle, or too deep: the class only
        return _type_name(value)
    seen, depth = seen | {id(value)}, depth + 1
    if isinstance(value, (list, tuple)):
        return [_described(v, seen, depth) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_described(v, seen, depth) for v in value), key=lambda d: json.dumps(d, sort_keys=True))
    if isinstance(value, dict):  # keys by their description: no repr, and 1 and "1" stay apart
        return {json.dumps(_described(k, seen, depth), sort_keys=True): _described(v, seen, depth)
                for k, v in value.items()}
    if isinstance(value, functools.partial):
        return {"partial": _described(value.func, seen, depth), "args": _described(value.args, seen, depth),
                "keywords": _described(value.keywords, seen, depth)}
    if inspect.ismethod(value):
        return {"method": f"{value.__func__.__module__}.{value.__func__.__qualname__}",
                "self": _described(value.__self__, seen, depth)}
    if inspect.isfunction(value) or inspect.isbuiltin(value):
        described = {"function": f"{getattr(value, '__module__', '')}.{value.__qualname__}"}
        if inspect.isfunction(value):
            cells = [c.cell_contents for c in value.__closure__ or ()]
            described.update(code=_code_digest(value.__code__), defaults=_described(value.__defaults__, seen, depth),
                             closure=_described(cells, seen, depth))
        return described
    if not hasattr(value, "__dict__"):
        return _type_name(value)
    return {"class": _type_name(value),
            **{k: _described(v, seen, depth) for k, v in sorted(vars(value).items()) if k != "R"}}


def preprocessing_hashing(transforms) -> bytes:
    """The cache key of the preprocessing: its transforms with their settings. MONAI's ``json_hashing`` cannot
    serialise a transform and falls back to the class names, so a cache made at another ``spatial_size`` or
    foreground fraction would be read back as if it were this one."""
    return json_hashing(_described(transforms))


def cached_scans(scans, preprocessing, cache_dir: str | Path, dataset_dir: str | Path | None):
    """The preprocessed ``scans`` (paths) as a MONAI PersistentDataset: decoded and resampled once, then read
    back from ``cache_dir``; the key includes the preprocessing's settings (:func:`preprocessing_hashing`), so
    changing them (e.g. ``spatial_size``) never reuses stale volumes. None for ``scans`` None (no foreign scans:
    ``poisson_inter`` is off)."""
    if scans is None:
        return None
    from monai.data import PersistentDataset

    return PersistentDataset([{"image": s} for s in scans], transform=preprocessing,
                             cache_dir=cache_folder(cache_dir, dataset_dir), hash_transform=preprocessing_hashing)


def check_arguments(dataset_dir, output_dir, bundle_root) -> None:
    """The checks before any work: the dataset folder is given, and the run folder exists (created), with a loud
    warning when it is the bundle itself (the shipped weights get replaced)."""
    if not dataset_dir:
        raise ValueError("--dataset_dir is required: the folder of normal *.nii.gz / *.nii scans to train on")
    if not output_dir:
        raise ValueError("--output_dir is required: the run folder (models/, logs/, metrics.json)")
    output = Path(output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    if output == Path(bundle_root).resolve():
        logger.warning("output_dir is the bundle root: this run replaces the shipped weights in %s/models", output)


def initial_weights(network: torch.nn.Module, init_models_dir: str | Path | None, dataset: str,
                    fold: int) -> torch.nn.Module:
    """Fine-tuning: start fold ``fold`` from ``<init_models_dir>/<dataset>/fold_<fold>.pt`` (a plain state dict
    of the network this run builds, e.g. the shipped weights); ``None`` keeps the network's initialisation."""
    if init_models_dir is None:
        return network
    path = Path(init_models_dir) / dataset / f"fold_{fold}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"init_models_dir: {path} does not exist (fold {fold} would start from it)")
    load_weights(network, path, "the network this run builds (its network_* settings must match the model's)")
    logger.info("fold %d starts from %s", fold, path)
    return network


def _relative(scans, dataset_dir) -> list[str]:
    """Scan paths as names relative to the dataset folder: a record never names the machine that trained it."""
    root = Path(dataset_dir).resolve()
    out = []
    for scan in scans:
        path = Path(scan).resolve()
        out.append(str(path.relative_to(root)) if path.is_relative_to(root) else path.name)
    return out


def fold_split_record(split: CrossValidationSplit, dataset_dir) -> dict:
    """A fold's split as its ``fold_<k>.json`` keeps it: scans named relative to the dataset folder."""
    record = {k: list(v) if isinstance(v, tuple) else v for k, v in split.__dict__.items()}
    record["train_scans"] = _relative(split.train_scans, dataset_dir)
    record["val_scans"] = _relative(split.val_scans, dataset_dir)
    return record


def save_fold_result(ensemble_dir, fold: int, split: CrossValidationSplit, dataset_dir, evaluator, key_metric: str,
                     network: torch.nn.Module, recipe: dict | None = None, budget=None) -> dict:
    """Write ``fold_<k>.json``: this fold's split (scans relative to the dataset folder), its best validation
    result, the ``recipe`` (the training settings) and, from the :class:`scripts.training.handlers.TimeBudget`
    ``budget``, how the run ended (epochs, seconds, what stopped it). The setup the folds share is in the plan
    (``plans.json``). In a DDP run only rank 0 writes."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
        return {}
    split_record = fold_split_record(split, dataset_dir)
    record = {
        "fold": fold,
        "split": split_record,
        "parameters": sum(p.numel() for p in network.parameters()),
        "key_metric": key_metric,
        "best_metric": float(evaluator.state.best_metric),
        "best_metric_epoch": int(evaluator.state.best_metric_epoch),
        "train_tasks": list(split.train_tasks),
        "val_tasks": list(split.val_tasks),
        "checkpoint": f"fold_{fold}.pt",
        "recipe": dict(recipe or {}),
    }
    if budget is not None and budget.trainer is not None:
        record["training"] = {"epochs": int(budget.trainer.state.epoch), "seconds": round(budget.elapsed(), 1),
                              "longest_epoch_seconds": round(budget.longest_epoch, 1),
                              "stopped_by": budget.stopped_by}
    save_json(record, Path(ensemble_dir) / f"fold_{fold}.json")
    return record


def _fold_command(fold: int, config_files: list[str], overrides: list[str], bundle_root: str) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run",
        "--meta_file", str(Path(bundle_root) / "configs" / "metadata.json"),
        "--bundle_root", bundle_root,
        "--config_file", repr(config_files),
        "--fold", str(fold),
        *overrides,
    ]


def _parse_overrides(overrides: list[str]) -> dict:
    """``--key value`` / ``--key=value`` command-line overrides as MONAI's CLI (python-fire) reads them: Python
    literals where they parse (bare words in a list are strings: ``[texture,mirror]``), strings otherwise."""
    parsed, items = {}, list(overrides)
    while items:
        flag = items.pop(0)
        if not flag.startswith("--"):
            raise ValueError(f"expected --key value, got {flag!r}")
        key, _, value = flag[2:].partition("=")
        if not _:
            if not items:
                raise ValueError(f"{flag} has no value")
            value = items.pop(0)
        parsed[key] = fire.parser.DefaultParseValue(value)  # as the fold processes (monai.bundle run) read it
    return parsed


def write_plan(config_files: list[str], overrides: list[str], bundle_root: str) -> tuple[str, Path, int]:
    """Make the plan of the run from its configs and overrides and write it once, before any fold starts (the
    folds then find it and only check it). Returns ``(dataset_name, models folder, num_train_tasks)``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_meta(str(Path(bundle_root) / "configs" / "metadata.json"))
    parser.read_config(config_files)
    parser.update({"bundle_root": bundle_root, **_parse_overrides(overrides)})
    parser.get_parsed_content("initialize")
    parser.get_parsed_content("write_plan")  # train.yaml's plan step
    return (str(parser.get_parsed_content("dataset_name")), Path(parser.get_parsed_content("ensemble_dir")),
            int(parser.get_parsed_content("num_train_tasks")))


def train_folds(config_files: list[str], output_dir: str, num_train_tasks: int | None = None,
                overrides: list[str] | None = None, bundle_root: str = "bundle", gpus: int | None = None,
                folds: list[int] | None = None, parallel_folds: int | None = None, calibrate: bool = True) -> dict:
    """Write the plan, then train every model fold of a split (one process per fold, spread over the GPUs when
    there are several; ``parallel_folds`` at a time, default one per GPU, so that one large GPU can train
    several small folds at once) and write ``<output_dir>/models/<dataset>/summary.json`` with each fold's
    validation result. Then, once every fold of the plan is there, ``calibrate`` records the ensemble's operating
    points in the plan (:func:`scripts.calibration.calibrate_training_run`)."""
    if parallel_folds is not None and parallel_folds < 1:
        raise ValueError(f"parallel_folds must be at least 1, got {parallel_folds}")
    overrides = list(overrides or []) + ["--output_dir", output_dir]
    if num_train_tasks is not None:  # else the configs' (train.yaml: 1; classifier.yaml: 4)
        overrides += ["--num_train_tasks", str(num_train_tasks)]
    dataset, ensemble_dir, num_train_tasks = write_plan(config_files, overrides, bundle_root)
    folds = list(range(len(model_folds(num_train_tasks)))) if folds is None else folds
    gpus = torch.cuda.device_count() if gpus is None else gpus
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(bundle_root).resolve()), env.get("PYTHONPATH")]))
    env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS"), MONAI_CONFIG_NOTICE_FILTER]))

    def run(position: int) -> tuple[int, int, float]:
        fold = folds[position]
        fold_env = dict(env)
        if gpus > 1:
            fold_env["CUDA_VISIBLE_DEVICES"] = str(position % gpus)
        start = time.perf_counter()
        logger.info("training fold %d", fold)
        code = subprocess.call(_fold_command(fold, config_files, overrides, bundle_root), env=fold_env)
        return fold, code, time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=parallel_folds or max(1, gpus)) as pool:
        outcomes = list(pool.map(run, range(len(folds))))
    failed = [fold for fold, code, _ in outcomes if code != 0]
    records = []
    for fold, code, seconds in outcomes:
        path = ensemble_dir / f"fold_{fold}.json"
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
    save_json(summary, ensemble_dir / "summary.json")
    classifier_files = {k: v for r in records if r.get("exit_code") == 0 for k, v in (r.get("files") or {}).items()}
    if classifier_files:  # inference refuses classifier files the plan does not record
        record_classifier_files(ensemble_dir, classifier_files)
    fused = [r for r in records if r.get("exit_code") == 0 and "fusion_validation" in r]
    if fused and not failed:
        from scripts.classifier.fusion import record_fusion

        record_fusion(ensemble_dir, fused, Path(fused[0]["recipe"]["fuse_with"]) / dataset)
    if failed:
        raise RuntimeError(f"folds {failed} failed; see the logs above and {ensemble_dir / 'summary.json'}")
    if calibrate:
        plan = load_plan(ensemble_dir.parent, dataset)
        kinds = (["fold_{}.pt"] if plan["network"] else []) + (["classifier_{}.txt"] if plan["classifier"] else [])
        missing = [f["fold"] for f in plan["split"]["model_folds"]
                   if not all((ensemble_dir / kind.format(f["fold"])).is_file() for kind in kinds)]
        if missing:
            logger.warning("no operating points: folds %s of the plan are not trained yet", missing)
        else:
            logger.info("measuring the ensemble's operating points on the synthetic validation")
            try:
                calibrate_training_run(config_files, _parse_overrides(overrides), bundle_root)
            except Exception as err:  # the folds are trained and kept: only the thresholds are missing

                logger.error("the operating points could not be measured (%s); the models are complete. Measure "
                             "them with 'python -m scripts.calibration --models_dir %s --dataset %s --training_dir "
                             "<training scans>'", describe_error(err), ensemble_dir.parent, dataset)
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Train all model folds of a cross-validation split.")
    parser.add_argument("--config_file", nargs="+", required=True,
                        help="common.yaml, train.yaml and a dataset overlay")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_train_tasks", type=int, default=None,
                        help="training tasks per model fold (default: the configs', 1 for networks, 4 for classifiers)")
    parser.add_argument("--folds", type=int, nargs="*", default=None, help="default: all folds of the split")
    parser.add_argument("--bundle_root", default="bundle")
    parser.add_argument("--gpus", type=int, default=None, help="default: all visible GPUs")
    parser.add_argument("--parallel_folds", type=int, default=None,
                        help="folds trained at once (default: one per GPU, one on the CPU)")
    parser.add_argument("--no_calibration", action="store_true",
                        help="do not measure the operating points (thresholds) on the synthetic validation after")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        summary = train_folds(args.config_file, args.output_dir, args.num_train_tasks, overrides=overrides,
                              bundle_root=args.bundle_root, gpus=args.gpus, folds=args.folds,
                              parallel_folds=args.parallel_folds, calibrate=not args.no_calibration)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as err:  # one line, before any fold or after all

        raise SystemExit(f"training: {describe_error(err)}") from None
    print(json.dumps({k: v for k, v in summary.items() if k != "folds"}, indent=1))
    return summary


if __name__ == "__main__":
    main()
