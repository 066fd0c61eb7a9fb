"""The plan of a trained model: one record per dataset, next to the fold weights (``models/<dataset>/plans.json``),
that says everything a consumer needs to rebuild the network and the preprocessing: the network definition, the
working grid and the patch size the network was trained on, the foreground threshold, the intensity normalisation and
its statistics, the cross-validation split, the sample-score aggregation, and the versions it was made with.

After nnU-Net's ``plans.json`` (Isensee et al. 2021, nnU-Net, Nature Methods; nnunetv2/experiment_planning): the
plan is written once before the folds train and read by training and prediction alike. Inference, the exports,
the MONAI Deploy app and the benchmarks build everything from it, so a model trained with other settings (another
width, another grid) loads without any extra flag.

    python -m scripts.migrate_plans --models_dir OLD_RUN/models --dataset brain   # models trained before 0.5.0
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from scripts.data.splits import NUM_FOLDS, assign_folds, cross_validation_split, model_folds
from scripts.io.files import BUNDLE_ROOT, bundle_configs, load_json, save_json

logger = logging.getLogger(__name__)


PLAN_FILE = "plans.json"


PLAN_FORMAT = 1
# how a scan's intensities are normalised (scripts.transforms.NormaliseIntensity)
NORMALISATION_MODES = ("zscore", "robust", "fingerprint", "none")


# the plan's parts that versions do not change: two plans that agree on these describe the same model setup
_SETUP_KEYS = ("plan_format", "dataset", "network", "spatial_size", "patch_size", "sliding_window", "slice_axis",
               "foreground_fraction", "normalisation", "split", "sample_score", "classifier")


# added to the format later, with the value every plan written before them means
_LATER_KEYS = {"patch_size": None, "sliding_window": False, "slice_axis": None, "classifier": None}

# the model kinds a models folder may hold: fold networks (``fold_<k>.pt``) and voxel classifiers
# (``classifier_<k>.txt``, scripts.classifier); the plan's ``network`` and ``classifier`` say which it has
MODEL_KINDS = ("network", "voxel_classifier")


class PlanConflictError(ValueError):
    """A run would add folds to a models folder whose plan describes another setup."""


def versions() -> dict:
    """The versions a plan was made with: the bundle's (its metadata.json) and the libraries'."""
    import monai
    import numpy

    metadata = BUNDLE_ROOT / "configs" / "metadata.json"
    bundle = json.loads(metadata.read_text()).get("version") if metadata.is_file() else None
    return {"bundle": bundle, "monai": monai.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def split_record(scans: Sequence[str], num_train_tasks: int = 1, tasks: Sequence[str] | None = None,
                 train_tasks: Sequence[str] | None = None, num_folds: int = NUM_FOLDS) -> dict:
    """The cross-validation of a dataset, every model fold included, with scans named relative to their folder
    (the data fold of a scan depends on its file name only, see :func:`scripts.data.splits.assign_folds`)."""
    folds_of = assign_folds(scans, num_folds)
    count = num_folds if train_tasks else len(model_folds(num_train_tasks, num_folds))
    folds = []
    for fold in range(count):
        split = cross_validation_split(scans, fold, num_train_tasks, tasks, train_tasks, num_folds)
        folds.append({"fold": fold, "train_tasks": list(split.train_tasks), "val_tasks": list(split.val_tasks),
                      "train_data_folds": list(split.train_data_folds), "val_data_folds": list(split.val_data_folds)})
    return {
        "num_folds": num_folds,
        "num_train_tasks": None if train_tasks else num_train_tasks,
        "tasks": list(split.tasks),
        "train_tasks": list(train_tasks) if train_tasks else None,
        "data_folds": {Path(s).name: folds_of[s] for s in scans},
        "model_folds": folds,
    }


def make_plan(dataset: str, network: Mapping | None, spatial_size: Sequence[int], normalisation: str,
              fingerprint: Mapping | None = None, foreground_fraction: float = 0.1, split: Mapping | None = None,
              sample_score_fraction: float = 0.01, patch_size: Sequence[int] | None = None,
              sliding_window: bool = False, slice_axis: int | None = None,
              sample_score_aggregation: str = "mean_of_top_fraction", classifier: Mapping | None = None) -> dict:
    """The plan of one dataset's models.

    Args:
        dataset: the dataset name (``brain``, ``abdom``): the models' folder under ``models/``.
        network: ``{"name": <class in monai.networks.nets>, "args": {...}}``, the arguments as the network takes them;
            None for a folder of voxel classifiers alone.
        spatial_size: the working grid every scan is resampled to.
        normalisation: ``zscore`` or ``robust`` (each scan's own foreground) or ``fingerprint`` (the training data's
            statistics): :class:`scripts.transforms.NormaliseIntensity`.
        fingerprint: the statistics of :func:`scripts.data.datasets.compute_fingerprint`, for ``fingerprint``; None
            while the data are not read yet (the plan step adds it when it writes the plan: :func:`ensure_plan`).
        foreground_fraction: the foreground threshold of :class:`scripts.transforms.IntensityForegroundd`.
        split: :func:`split_record` of the training data (None when unknown).
        sample_score_fraction: the sample score is the mean of this fraction of the highest voxels of the map.
        patch_size: the crops of the working grid the network trains on; None: the whole grid. Each side at most
            the grid's and a multiple of the network's total downsampling.
        sliding_window: models trained on patches see a whole scan in sliding windows of the patch size (True) or
            in one pass (False), in validation and inference.
        slice_axis: None for a 3D network; 0, 1 or 2 for a 2D network (``spatial_dims`` 2) trained on slices of the
            working grid along that axis and applied slice by slice (:class:`scripts.networks.SliceWiseNetwork`).
        sample_score_aggregation: ``mean_of_top_fraction`` or FPI's ``fpi_top_slices``
            (:func:`scripts.plans.sample_score_method`; its slices along ``slice_axis``, else axis 2).
        classifier: the voxel classifier's record (``{"features": ..., "learner": ...}``: its feature bank and its
            learner, :mod:`scripts.classifier`), None for networks alone; training adds its files' SHA-256
            (``files``) once its folds are trained (:func:`record_classifier_files`).
    """
    if normalisation not in NORMALISATION_MODES:
        raise ValueError(f"normalisation must be one of {NORMALISATION_MODES}, got {normalisation!r}")
    if network is None and classifier is None:
        raise ValueError("a plan needs a network, a classifier or both")
    if network is not None and set(network) != {"name", "args"}:
        raise ValueError(f"network must be {{'name': ..., 'args': {{...}}}}, got keys {sorted(network)}")
    if classifier is not None and not {"features", "learner"} <= set(classifier):
        raise ValueError(f"classifier must hold 'features' and 'learner', got keys {sorted(classifier)}")
    dims = len(spatial_size) if network is None else int(network["args"].get("spatial_dims", len(spatial_size)))
    if network is None and (slice_axis is not None or patch_size is not None):
        raise ValueError("slice_axis and patch_size describe networks: a classifier alone scores the whole grid")
    if slice_axis is not None:
        if slice_axis not in (0, 1, 2) or len(spatial_size) != 3 or dims != 2:
            raise ValueError(f"slice_axis {slice_axis!r}: a slice-wise model is a 2D network (spatial_dims 2, this one "
                             f"has {dims}) on slices along axis 0, 1 or 2 of a 3D working grid {list(spatial_size)}")
        if patch_size is not None:
            raise ValueError("a slice-wise model trains on whole slices: patch_size must be null")
        plane = [int(s) for a, s in enumerate(spatial_size) if a != slice_axis]
        _checked_patch_size(plane, plane, network)  # the slice must pass the network's poolings
    elif dims != len(spatial_size):
        raise ValueError(f"a {dims}D network on a {len(spatial_size)}D working grid {list(spatial_size)}: set "
                         "slice_axis for a 2D network on slices of the grid")
    if patch_size is not None:
        patch_size = _checked_patch_size(patch_size, spatial_size, network)
    plan = {
        "plan_format": PLAN_FORMAT,
        "dataset": dataset,
        "network": None if network is None else {"name": str(network["name"]), "args": dict(network["args"])},
        "spatial_size": [int(s) for s in spatial_size],
        "patch_size": patch_size,
        "sliding_window": bool(sliding_window) and patch_size is not None,
        "slice_axis": None if slice_axis is None else int(slice_axis),
        "foreground_fraction": float(foreground_fraction),
        "normalisation": {"mode": normalisation, "fingerprint": None},
        "split": None if split is None else dict(split),
        "sample_score": sample_score_method(sample_score_aggregation, sample_score_fraction, slice_axis),
        "classifier": None if classifier is None else {k: v for k, v in dict(classifier).items() if k != "files"},
        "versions": versions(),
    }
    if fingerprint is not None:
        plan = with_fingerprint(plan, fingerprint)
    return json.loads(json.dumps(plan))  # plain JSON types (tuples become lists), as read back from the file


def with_fingerprint(plan: Mapping, fingerprint: Mapping | None) -> dict:
    """``plan`` completed with the training data's intensity ``fingerprint`` where its normalisation uses one (the
    data-derived part of the plan; the plan's setup comes from the settings alone); an error when it needs one and
    has none."""
    plan = dict(plan)
    normalisation = dict(plan["normalisation"])
    if normalisation["mode"] == "fingerprint":
        normalisation["fingerprint"] = dict(fingerprint) if fingerprint is not None else normalisation["fingerprint"]
        if normalisation["fingerprint"] is None:
            raise ValueError("normalisation 'fingerprint' needs the training data's fingerprint")
    plan["normalisation"] = normalisation
    return plan


def _checked_patch_size(patch_size: Sequence[int], spatial_size: Sequence[int], network: Mapping) -> list[int]:
    """``patch_size`` as a list, or a clear error when it is not one crop of the grid that the network takes."""
    patch = [int(s) for s in patch_size]
    if len(patch) != len(spatial_size) or any(not 0 < p <= g for p, g in zip(patch, spatial_size)):
        raise ValueError(f"patch_size {patch} must have one positive side per axis of the working grid "
                         f"{list(spatial_size)}, none larger")
    strides = network["args"].get("strides") or []
    factor = [math.prod(int(s[i]) if isinstance(s, Sequence) else int(s) for s in strides) for i in range(len(patch))]
    if any(p % f for p, f in zip(patch, factor)):
        raise ValueError(f"patch_size {patch}: each side must be a multiple of the network's downsampling {factor}")
    return patch


def _setup_value(plan: Mapping, key: str):
    value = plan.get(key, _LATER_KEYS.get(key))
    if key == "classifier" and value is not None:  # its files are recorded after training; its scoring is how
        value = {k: v for k, v in value.items() if k not in ("files", "scoring")}  # inference reads the same trees
    return value


def _differing_keys(a: Mapping, b: Mapping) -> list[str]:
    return [key for key in _SETUP_KEYS if _setup_value(a, key) != _setup_value(b, key)]


def record_classifier_files(ensemble_dir: str | os.PathLike, files: Mapping[str, str]) -> Path:
    """Add the SHA-256 of trained classifier files (name -> digest) to the plan in ``ensemble_dir``: inference
    refuses any classifier file that is not the one recorded there."""
    path = Path(ensemble_dir) / PLAN_FILE
    plan = load_json(path)
    if not plan.get("classifier"):
        raise ValueError(f"{str(path)!r} has no classifier to record files for")
    plan["classifier"]["files"] = {**(plan["classifier"].get("files") or {}), **dict(files)}
    return save_json(plan, path)


def ensure_plan(ensemble_dir: str | os.PathLike, plan: Mapping, fingerprint: Mapping | None = None) -> Path:
    """The plan step's write: ``plan`` (completed with the data's ``fingerprint``, :func:`with_fingerprint`) to
    ``ensemble_dir/plans.json`` unless it is there already; a folder that holds another plan is refused with
    :class:`PlanConflictError` (its folds would not make one ensemble).

    Safe when several processes (the folds, the ranks of a DDP run) call it at once: the file is created whole and
    only once (a hard link of a finished temporary file), and everyone else compares with it."""
    path = Path(ensemble_dir) / PLAN_FILE
    plan = json.loads(json.dumps(with_fingerprint(plan, fingerprint)))
    try:
        save_json(plan, path, replace=False)
        logger.info("wrote the plan of the %s models: %s", plan.get("dataset"), path)
        return path
    except FileExistsError:
        pass
    existing = load_json(path)
    differ = _differing_keys(existing, plan)
    if differ:
        details = "; ".join(f"{k}: {json.dumps(existing.get(k))[:120]} there, {json.dumps(plan.get(k))[:120]} now"
                            for k in differ)
        raise PlanConflictError(
            f"{str(path)!r} describes another setup ({details}): its folds would not form one ensemble. "
            "Train into another --output_dir, or delete that models folder to start over")
    if existing.get("versions") != plan.get("versions"):
        logger.warning("%s was made with %s; this run has %s", path, existing.get("versions"), plan.get("versions"))
    return path


def load_plan(models_dir: str | os.PathLike, dataset: str) -> dict:
    """The plan of ``models_dir/<dataset>``, checked; clear errors for a missing folder, a folder of models trained
    before plans existed (with the command that adds one), and a plan of another dataset."""
    folder = Path(models_dir) / dataset
    path = folder / PLAN_FILE
    if not path.is_file():
        if any(folder.glob("fold_*.pt")):
            raise FileNotFoundError(
                f"{str(folder)!r} holds fold models but no {PLAN_FILE} (they were trained before plans existed): "
                "add one with 'PYTHONPATH=bundle python -m scripts.migrate_plans "
                f"--models_dir {models_dir} --dataset {dataset}', or retrain")
        if not folder.is_dir():
            raise FileNotFoundError(f"no trained models for {dataset!r}: {str(folder)!r} does not exist; train with "
                                    "'make train' or pass --models_dir <run folder>/models")
        raise FileNotFoundError(f"no {PLAN_FILE} in {str(folder)!r}: train with 'make train' or pass --models_dir")
    plan = {**_LATER_KEYS, **load_json(path)}
    if plan.get("plan_format") != PLAN_FORMAT:
        raise ValueError(f"{str(path)!r} has plan_format {plan.get('plan_format')!r}; this bundle reads {PLAN_FORMAT}")
    if plan.get("dataset") != dataset:
        raise ValueError(f"{str(path)!r} is the plan of {plan.get('dataset')!r} models, not {dataset!r}")
    missing = [k for k in _SETUP_KEYS if k not in plan]
    if missing:
        raise ValueError(f"{str(path)!r} lacks {missing}")
    try:
        with_fingerprint(plan, None)
    except ValueError as err:
        raise ValueError(f"{str(path)!r}: {err}") from None
    plan.setdefault("operating_points", None)  # recorded after training (scripts.calibration)
    return plan


def default_plan(dataset: str, bundle_root: str | os.PathLike | None = None, fingerprint: Mapping | None = None,
                 **overrides) -> dict:
    """The plan training would make with its default settings (``train.yaml`` + the dataset overlay, with
    ``overrides`` of its knobs, e.g. ``spatial_size=[32, 32, 32]``), without data: no split, and ``fingerprint``
    as given. For models made outside training (tests, benchmarks)."""
    from monai.bundle import ConfigParser

    bundle_root = Path(bundle_root) if bundle_root is not None else BUNDLE_ROOT
    parser = ConfigParser()
    parser.read_config(bundle_configs(bundle_root, "train", dataset))
    parser.update({**overrides, "plan_settings#split": None})
    plan = make_plan(**parser.get_parsed_content("plan_settings"))  # train.yaml's plan step, its errors as they are
    if plan["normalisation"]["mode"] == "fingerprint" and fingerprint is None:
        raise ValueError(f"the {dataset!r} models normalise with a fingerprint: pass one")
    return with_fingerprint(plan, fingerprint)


# how a map becomes one score per scan (the plan's ``sample_score`` record names one):
# - mean_of_top_fraction: the mean of the map's ``top_fraction`` highest voxels (the bundle's default);
# - fpi_top_slices: FPI's (Tan et al., MOOD 2020): the mean of each slice along ``slice_axis``, smoothed along that
#   axis by a Savitzky-Golay filter (polynomial order 2, a window of about ``window_fraction`` of the slices), then
#   the mean of the ``top_slices`` fraction of the highest smoothed slices
SAMPLE_SCORE_AGGREGATIONS = ("mean_of_top_fraction", "fpi_top_slices")


FPI_TOP_SLICES, FPI_WINDOW_FRACTION, FPI_POLYORDER = 0.25, 0.1, 2


def sample_score_method(aggregation: str = "mean_of_top_fraction", top_fraction: float = 1e-2,
                        slice_axis: int | None = None) -> dict:
    """The ``sample_score`` record of a plan: ``aggregation`` (:data:`SAMPLE_SCORE_AGGREGATIONS`) with its
    parameters; ``fpi_top_slices`` cuts along ``slice_axis`` (default 2, the axial axis of the RAS grid)."""
    if aggregation not in SAMPLE_SCORE_AGGREGATIONS:
        raise ValueError(f"sample score aggregation must be one of {SAMPLE_SCORE_AGGREGATIONS}, got {aggregation!r}")
    method = {"aggregation": aggregation, "top_fraction": float(top_fraction)}
    if aggregation == "fpi_top_slices":
        method.update(slice_axis=2 if slice_axis is None else int(slice_axis), top_slices=FPI_TOP_SLICES,
                      window_fraction=FPI_WINDOW_FRACTION, polyorder=FPI_POLYORDER)
    return method


def network_dims(spatial_size: Sequence[int], slice_axis: int | None) -> int:
    """The network's spatial dimensions: the grid's, or 2 for a slice-wise model (a 2D network on slices)."""
    return len(spatial_size) if slice_axis is None else 2


def network_filters(base: int, maximum: int, depth: int) -> list[int]:
    """The filters of each level, doubling from ``base`` up to ``maximum`` (nnU-Net's rule)."""
    return [min(base * 2**i, maximum) for i in range(depth)]


def chosen_sample_score(plan: Mapping, aggregation: str | None = None) -> dict:
    """The sample score a run uses: the plan's record, or ``aggregation`` with the plan's parameters (a run that
    overrides it flags nothing: its operating points were measured with the plan's)."""
    if not aggregation:
        return dict(plan["sample_score"])
    return sample_score_method(aggregation, plan["sample_score"]["top_fraction"], plan.get("slice_axis"))
