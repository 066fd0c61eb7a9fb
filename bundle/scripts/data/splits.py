"""The task x data-fold cross-validation of "Many tasks make light work" (Baugh et al., MICCAI 2023): data folds by
file name, model folds as combinations of training tasks, the split of one model fold."""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


NUM_FOLDS = 5


# Task i is paired with data fold i. Index 1 is the inter-dataset blend, replaced by FPI without a foreign set.
PAPER_TASKS = ("poisson_intra", "poisson_inter", "sink", "source", "smooth_intensity")


def assign_folds(scans: Sequence[str], num_folds: int = NUM_FOLDS) -> dict[str, int]:
    """Data fold of every scan: deterministic, balanced, and independent of the order of ``scans``.

    Scans are ordered by a hash of their file name (not of the listing, nor of the folder they sit in)
    and dealt round-robin, so every fold size is within one of the others.
    """
    names = [Path(s).name for s in scans]
    if len(set(names)) != len(names):
        raise ValueError("scan file names must be unique to assign data folds")
    order = sorted(scans, key=lambda s: (hashlib.sha1(Path(s).name.encode()).hexdigest(), Path(s).name))
    return {scan: i % num_folds for i, scan in enumerate(order)}


def default_tasks(has_foreign: bool) -> list[str]:
    """The five cross-validation tasks; without a foreign dataset ``fpi`` replaces ``poisson_inter``."""
    tasks = list(PAPER_TASKS)
    if not has_foreign:
        logger.info("no foreign_dir: task 'poisson_inter' is off and 'fpi' takes its place in the five tasks")
        tasks[PAPER_TASKS.index("poisson_inter")] = "fpi"
    return tasks


def model_folds(num_train_tasks: int, num_tasks: int = NUM_FOLDS) -> list[tuple[int, ...]]:
    """Training-task indices of every model fold: ``combinations(range(num_tasks), num_train_tasks)``."""
    if not 1 <= num_train_tasks < num_tasks:
        raise ValueError(f"num_train_tasks must be in 1..{num_tasks - 1}, got {num_train_tasks}")
    return list(itertools.combinations(range(num_tasks), num_train_tasks))


@dataclass(frozen=True)
class CrossValidationSplit:
    fold: int
    tasks: tuple[str, ...]  # the five tasks, task i paired with data fold i
    train_tasks: tuple[str, ...]
    val_tasks: tuple[str, ...]
    train_data_folds: tuple[int, ...]
    val_data_folds: tuple[int, ...]
    train_scans: tuple[str, ...]
    val_scans: tuple[str, ...]

    def subset(self, dataset: Sequence, scans: Sequence[str], part: str) -> torch.utils.data.Subset:
        """The items of ``dataset`` (one per scan of ``scans``, in that order) that ``part`` ("train" or "val")
        uses."""
        if part not in ("train", "val"):
            raise ValueError(f"part must be 'train' or 'val', got {part!r}")
        index = {scan: i for i, scan in enumerate(scans)}
        chosen = self.train_scans if part == "train" else self.val_scans
        return torch.utils.data.Subset(dataset, [index[s] for s in chosen])

    def describe(self) -> str:
        return (
            f"model fold {self.fold}: train tasks {list(self.train_tasks)} on data folds "
            f"{list(self.train_data_folds)} ({len(self.train_scans)} scans); validate on tasks "
            f"{list(self.val_tasks)} on data folds {list(self.val_data_folds)} ({len(self.val_scans)} scans)"
        )


def cross_validation_split(
    scans: Sequence[str],
    fold: int,
    num_train_tasks: int = 1,
    tasks: Sequence[str] | None = None,
    train_tasks: Sequence[str] | None = None,
    num_folds: int = NUM_FOLDS,
) -> CrossValidationSplit:
    """The training and validation tasks and scans of model fold ``fold``.

    With ``train_tasks`` given explicitly (e.g. ``["fpi"]``, the FPI-only baseline), the model trains on
    those and validates on the remaining ``tasks``, with plain k-fold data splitting: data fold ``fold``
    validates and the others train.
    """
    tasks = list(tasks) if tasks is not None else default_tasks(has_foreign=True)
    if len(tasks) != num_folds:
        raise ValueError(f"cross-validation pairs {num_folds} tasks with {num_folds} data folds, got tasks {tasks}")
    folds_of = assign_folds(scans, num_folds)
    if train_tasks:
        if not 0 <= fold < num_folds:
            raise ValueError(f"fold must be in 0..{num_folds - 1} with explicit train_tasks, got {fold}")
        train_idx = ()
        train_names = tuple(train_tasks)
        val_names = tuple(t for t in tasks if t not in train_names)
        train_data = tuple(f for f in range(num_folds) if f != fold)
        val_data = (fold,)
    else:
        combos = model_folds(num_train_tasks, num_folds)
        if not 0 <= fold < len(combos):
            raise ValueError(
                f"fold must be in 0..{len(combos) - 1} for num_train_tasks={num_train_tasks}, got {fold}"
            )
        train_idx = combos[fold]
        held_out = tuple(i for i in range(num_folds) if i not in train_idx)
        train_names = tuple(tasks[i] for i in train_idx)
        val_names = tuple(tasks[i] for i in held_out)
        # the majority rule: the larger group of data folds trains
        train_data, val_data = (train_idx, held_out) if len(train_idx) >= len(held_out) else (held_out, train_idx)
    train_scans = tuple(s for s in scans if folds_of[s] in train_data)
    val_scans = tuple(s for s in scans if folds_of[s] in val_data)
    if not train_scans or not val_scans:
        raise ValueError(
            f"{len(scans)} scans are too few for model fold {fold}: {len(train_scans)} train, "
            f"{len(val_scans)} validate; every one of the {num_folds} data folds needs at least one scan "
            f"(at least {num_folds} scans)"
        )
    return CrossValidationSplit(
        fold=fold,
        tasks=tuple(tasks),
        train_tasks=train_names,
        val_tasks=val_names,
        train_data_folds=tuple(train_data),
        val_data_folds=tuple(val_data),
        train_scans=train_scans,
        val_scans=val_scans,
    )
