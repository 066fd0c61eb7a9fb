"""Training one model fold of the voxel classifier, by the cross-validation the networks use ("Many tasks make
light work", Baugh et al. 2023): the fold learns from synthetic samples of its training tasks on its training data
folds and is validated on its held-out tasks on the other data folds; the folds form the ensemble.

Rows: from each synthetic sample (``samples`` of them, drawn by training's own dataset: the tasks, the
flipped-Gaussian labeller), ``voxels_per_sample`` voxels of the foreground box, half where the label is above 0
(the sample's anomalies) and half where it is 0 (its normal tissue; all of them when the sample drew no anomaly).
The soft label is the target of LightGBM's cross-entropy objective, as it is the networks' BCE target; the two
halves weigh the same. The held-out tasks' validation samples give the rows that stop the boosting early and the
fold's validation result (pixel and sample AP on their whole maps, as the networks' validation).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from scripts.classifier.features import FeatureBank, NormativeStatistics, foreground_of, scored_voxels, sha256_of
from scripts.classifier.fusion import CANDIDATES, candidate_name, fuse
from scripts.classifier.model import VoxelClassifierEnsemble, classifier_files, load_booster
from scripts.io.files import save_json, write_atomically
from scripts.training.metrics import PixelAveragePrecision, SampleAveragePrecision

__all__ = ["LEARNER_DEFAULTS", "learner_record", "sample_rows", "train_fold"]

logger = logging.getLogger(__name__)

# LightGBM (Ke et al., NeurIPS 2017): multi-threaded histogram boosting with a text model format; deterministic
# for a seed on one machine
LEARNER_DEFAULTS = {"objective": "cross_entropy", "learning_rate": 0.05, "num_leaves": 63, "min_data_in_leaf": 200,
                    "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
                    "max_bin": 255, "num_boost_round": 200, "early_stopping_rounds": 0}
# early_stopping_rounds 0: every round kept (chosen on the held-out tasks: 200 fixed rounds beat stopping on them,
# docs/experiments/2026-12-07-voxel-classifier.md); N > 0: stop N rounds after the held-out rows' loss stopped falling


# the share of a sample's normal rows drawn from the background inside the foreground box (the map must be 0 there
# too, but telling air from tissue is easy)
BACKGROUND_SHARE = 0.1


def learner_record(**overrides) -> dict:
    """The plan's record of the learner: the library, its version and its parameters."""
    import lightgbm

    params = {**LEARNER_DEFAULTS, **overrides}
    unknown = sorted(set(params) - set(LEARNER_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown learner settings {unknown}; the classifier takes {sorted(LEARNER_DEFAULTS)}")
    return {"library": "lightgbm", "version": lightgbm.__version__, "params": params}


def _array(value) -> np.ndarray:
    value = value.as_tensor() if hasattr(value, "as_tensor") else value
    value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return value[0] if value.ndim == 4 else value


def sample_rows(bank: FeatureBank, image, label, normative: NormativeStatistics, count: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` rows of one synthetic sample: half of its anomalous voxels (label above 0), half of its normal
    ones (:data:`BACKGROUND_SHARE` of those from the foreground box's background, the rest from the foreground:
    where the anomalies are, so that telling them apart is what the trees learn); the targets are the soft labels."""
    image, label = _array(image).astype(np.float32), _array(label).astype(np.float32).reshape(-1)
    box_voxels, _ = scored_voxels(image, bank.settings)
    foreground = foreground_of(image, bank.settings["foreground_fraction"]).reshape(-1)[box_voxels]
    normal = label[box_voxels] == 0
    positive = box_voxels[~normal]
    take_positive = min(len(positive), count // 2)
    chosen = [rng.choice(positive, take_positive, replace=False)]
    for pool, share in ((box_voxels[normal & ~foreground], BACKGROUND_SHARE),
                        (box_voxels[normal & foreground], 1 - BACKGROUND_SHARE)):
        chosen.append(rng.choice(pool, min(len(pool), int(round((count - take_positive) * share))), replace=False))
    chosen = np.concatenate(chosen)
    chosen.sort()
    shared = bank.shared(image, chosen)
    return bank.rows(shared, normative), label[chosen]


def _rows_of(dataset, indices, bank, normative, count, rng) -> tuple[np.ndarray, np.ndarray]:
    features, targets = [], []
    for i in indices:
        item = dataset[i]
        x, y = sample_rows(bank, item["image"], item["label"], normative, count, rng)
        features.append(x)
        targets.append(y)
    return np.concatenate(features), np.concatenate(targets)


def _balanced_weights(targets: np.ndarray) -> np.ndarray:
    """Weights under which the anomalous rows (target above 0) and the normal ones weigh the same in total."""
    positive = targets > 0
    weights = np.ones(len(targets), np.float32)
    if positive.any() and (~positive).any():
        weights[positive] = (~positive).sum() / positive.sum()
    return weights


def train_fold(train_dataset, val_dataset, normals: Sequence[Mapping], normalise, plan: Mapping,
               ensemble_dir: str | Path, fold: int, samples: int = 60, voxels_per_sample: int = 4000,
               val_maps: int = 20, seed: int = 0, fuse_with: str | Path | None = None,
               threads: int | None = None) -> dict:
    """Train model fold ``fold``: the normals' statistics from ``normals`` (its training data folds, preprocessed;
    ``normalise`` as the plan says), rows from ``samples`` items of ``train_dataset`` (its training tasks), early
    stopping on rows of ``val_dataset`` (its held-out tasks), the pixel and sample AP of the first ``val_maps``
    validation samples' whole maps. Writes ``classifier_<k>.txt``, ``normative_<k>.npz`` and returns the fold's
    result (files with their SHA-256, validation, timings) for ``fold_<k>.json``. ``fuse_with``: a models folder
    of networks trained on the same tasks, whose fold ``fold`` also scores the validation maps, fused with the
    classifier's by every candidate of :mod:`scripts.classifier.fusion` (``fusion_validation``)."""
    import lightgbm

    start = time.perf_counter()
    classifier, sample_score_method = plan["classifier"], plan["sample_score"]
    network, network_inferer = (_held_out_networks(plan, fuse_with, val_dataset.tasks) if fuse_with
                                else (None, None))
    threads = threads or torch.get_num_threads()
    bank = FeatureBank(classifier["features"])
    folder = Path(ensemble_dir)
    folder.mkdir(parents=True, exist_ok=True)
    model_name, normative_name = classifier_files(fold)
    rng = np.random.default_rng(seed + 7919 * fold)
    images = [_array(normalise(dict(item))["image"]) for item in normals]
    normative = NormativeStatistics.from_scans(images, bank.settings)
    del images
    normative_sha = normative.save(folder / normative_name)
    train_dataset.set_random_state(seed=seed + fold)
    x_train, y_train = _rows_of(train_dataset, [i % len(train_dataset) for i in range(samples)], bank, normative,
                                voxels_per_sample, rng)
    features_seconds = time.perf_counter() - start
    val_indices = list(range(len(val_dataset)))
    x_val, y_val = _rows_of(val_dataset, val_indices, bank, normative, max(voxels_per_sample // 4, 200), rng)
    params = dict(classifier["learner"]["params"])
    rounds, patience = params.pop("num_boost_round"), params.pop("early_stopping_rounds")
    params.update(num_threads=threads, seed=seed + fold, deterministic=True, force_row_wise=True, verbosity=-1,
                  monotone_constraints=bank.monotone(), monotone_constraints_method="advanced")
    names = bank.names()
    train_set = lightgbm.Dataset(x_train, y_train, weight=_balanced_weights(y_train), feature_name=names,
                                 free_raw_data=True)
    val_set = lightgbm.Dataset(x_val, y_val, weight=_balanced_weights(y_val), reference=train_set)
    fit_start = time.perf_counter()
    booster = lightgbm.train(params, train_set, num_boost_round=rounds, valid_sets=[val_set],
                             callbacks=[lightgbm.early_stopping(patience, verbose=False)] if patience > 0 else [])
    fit_seconds = time.perf_counter() - fit_start
    best = booster.best_iteration if patience > 0 and booster.best_iteration else rounds  # 0: every round
    text = booster.model_to_string(num_iteration=best)
    write_atomically(folder / model_name, lambda tmp: tmp.write_text(text))
    model_sha = sha256_of(folder / model_name)
    # the fold's validation on whole maps, with the files and the scoring of inference
    ensemble = VoxelClassifierEnsemble(bank, [(load_booster(folder / model_name, model_sha, threads),
                                               NormativeStatistics.load(folder / normative_name, normative_sha))],
                                       classifier.get("scoring"))
    pixel = PixelAveragePrecision()
    sample = SampleAveragePrecision(sample_score_method or 1e-2)
    fused = {candidate_name(m, w): PixelAveragePrecision() for m, w in CANDIDATES} if network is not None else {}
    per_task = {task: PixelAveragePrecision() for task in val_dataset.tasks}
    for i in val_indices[:val_maps]:
        item = val_dataset[i]
        task = val_dataset.tasks[val_dataset.indices[i] % len(val_dataset.tasks)]  # the fixed set's order
        image = _array(item["image"]).astype(np.float32)
        prediction = torch.from_numpy(ensemble.scan_map(image))
        label = torch.as_tensor(_array(item["label"]))[None]
        pixel.update(([prediction], [label]))
        sample.update(([prediction], [label]))
        per_task[task].update(([prediction], [label]))
        if network is not None:
            with torch.no_grad():
                network_map = network_inferer(torch.from_numpy(image)[None, None], network)[0]  # the folds' mean
            for (method, weight), metric in zip(CANDIDATES, fused.values()):
                metric.update(([fuse(prediction, network_map, method, weight)], [label]))
    importance = booster.feature_importance("gain", iteration=best)
    result = {
        "kind": "voxel_classifier",
        "files": {model_name: model_sha, normative_name: normative_sha},
        "pixel_ap": pixel.compute(),
        "sample_ap": sample.compute(),
        "val_samples": min(val_maps, len(val_indices)),
        "per_task_pixel_ap": {task: metric.compute() for task, metric in per_task.items()},
        **({"fusion_validation": {n: m.compute() for n, m in fused.items()}} if fused else {}),
        "best_iteration": int(best),
        "train_rows": int(len(y_train)),
        "feature_importance": {n: round(float(v) / max(float(importance.sum()), 1e-12), 4)
                               for n, v in zip(names, importance)},
        "seconds": {"features": round(features_seconds, 1), "fit": round(fit_seconds, 1),
                    "total": round(time.perf_counter() - start, 1)},
    }
    logger.info("classifier fold %d: validation pixel AP %.3f, sample AP %.3f (%d trees, %.0f s)", fold,
                result["pixel_ap"], result["sample_ap"], result["best_iteration"], result["seconds"]["total"])
    return result


def _held_out_networks(plan: Mapping, networks_dir: str | Path, val_tasks: Sequence[str]):
    """The network folds of ``networks_dir`` that trained on none of ``val_tasks`` (so that the fold's validation
    tasks are held out from both kinds), as one ensemble of their sigmoid maps in eval mode, with the inferer their
    plan says; an error when the networks do not fit the classifier's plan or none held these tasks out."""
    from scripts.classifier.fusion import check_fusable
    from scripts.classifier.fusion import networks_plan as fused_networks_plan
    from scripts.inference.ensemble import Ensemble, load_fold
    from scripts.networks import build_network, inferer_for

    folder = Path(networks_dir) / plan["dataset"]
    networks_plan = fused_networks_plan(networks_dir, plan["dataset"])
    check_fusable(plan, networks_plan, folder)
    held_out = [f["fold"] for f in networks_plan["split"]["model_folds"] if not set(f["train_tasks"]) & set(val_tasks)]
    if not held_out:
        raise ValueError(f"no network fold in {str(folder)!r} held out the validation tasks {list(val_tasks)}: their "
                         "fusion cannot be validated on tasks unseen by both")
    network_def = build_network(networks_plan)
    networks = [load_fold(network_def, folder / f"fold_{k}.pt", "pytorch") for k in held_out]
    logger.info("fusion validation against network folds %s (trained on none of %s)", held_out, list(val_tasks))
    return Ensemble(networks).eval(), inferer_for(networks_plan)


def save_fold_result(ensemble_dir, fold: int, split, dataset_dir, result: Mapping, recipe: Mapping) -> dict:
    """``fold_<k>.json`` of a classifier fold: its split, its validation result (``best_metric``: the pixel AP, the
    networks' key metric), its files' SHA-256 and the recipe."""
    from scripts.training.folds import fold_split_record

    split_record = fold_split_record(split, dataset_dir)
    record = {"fold": fold, "split": split_record, "key_metric": "val_pixel_ap", "best_metric": result["pixel_ap"],
              "train_tasks": list(split.train_tasks), "val_tasks": list(split.val_tasks), **dict(result),
              "recipe": dict(recipe)}
    save_json(record, Path(ensemble_dir) / f"fold_{fold}.json")
    return record
