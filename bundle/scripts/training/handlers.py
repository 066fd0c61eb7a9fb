"""Ignite handlers the workflows attach next to MONAI's own: the last validation, the metrics file and the time
budget of training (with the learning-rate schedule that spans it), and the per-case progress lines of
inference."""

from __future__ import annotations

import fcntl
import json
import logging
import math
import time
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from scripts.io.files import write_atomically

logger = logging.getLogger(__name__)


class FinalValidation:
    """Validation after the last epoch when it is not a multiple of ``interval`` (MONAI's ``ValidationHandler``
    validates every ``interval`` epochs and, with ``exec_at_start``, before training; not at the end)."""

    def __init__(self, validator, interval: int) -> None:
        self.validator = validator
        self.interval = interval

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.COMPLETED, self)

    def __call__(self, trainer: Engine) -> None:
        # epochs that are multiples of the interval were validated already (early stopping also only
        # triggers right after such a validation)
        if trainer.state.epoch % self.interval != 0:
            self.validator.run(trainer.state.epoch)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _agreed_maximum(value: float) -> float:
    """``value``'s maximum over the ranks of a DDP run (itself otherwise): every rank takes the same decision."""
    if not _distributed():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else None
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return float(tensor.item())


class TimeBudget:
    """Ends training within ``minutes`` of wall time, counted from the trainer's start (the validation before
    training included; caching the data before it is not). It stops at the end of an epoch, before an epoch that
    would not fit: when the time so far plus the longest epoch so far (its validation included) would pass the
    budget. Early stopping and ``max_epochs`` still apply; :class:`FinalValidation` validates the last epoch and
    the checkpoint handler keeps the best. ``minutes=None``: no budget (:meth:`progress` stays 0).

    :class:`WarmupCosineWithinBudget` reads :meth:`progress`, so the learning rate reaches its end as the budget
    does. ``stopped_by`` says what ended the run: ``time_budget``, ``early_stopping`` or ``max_epochs``."""

    def __init__(self, minutes: float | None) -> None:
        if minutes is not None and not float(minutes) > 0:
            raise ValueError(f"time_budget must be a positive number of minutes or null, got {minutes!r}")
        self.seconds = None if minutes is None else float(minutes) * 60.0
        self.started: float | None = None
        self.epoch_started = 0.0
        self.longest_epoch = 0.0
        self.stopped = False
        self.agreed_elapsed = 0.0
        self.trainer: Engine | None = None

    def attach(self, trainer: Engine) -> None:
        self.trainer = trainer
        trainer.add_event_handler(Events.STARTED, self._start)
        trainer.add_event_handler(Events.EPOCH_STARTED, self._epoch_start)

    def _start(self, trainer: Engine) -> None:
        self.started = time.perf_counter()
        # registered now, after every handler the config attached: the epoch's validation has run when it fires
        if not trainer.has_event_handler(self._check, Events.EPOCH_COMPLETED):
            trainer.add_event_handler(Events.EPOCH_COMPLETED, self._check)

    def _epoch_start(self, trainer: Engine) -> None:
        self.epoch_started = time.perf_counter()

    def _check(self, trainer: Engine) -> None:
        now = time.perf_counter()
        elapsed, epoch = _agreed_maximum(now - self.started), _agreed_maximum(now - self.epoch_started)
        self.longest_epoch = max(self.longest_epoch, epoch)
        self.agreed_elapsed = elapsed
        if self.seconds is None or trainer.should_terminate:  # early stopping ended it in this epoch's validation
            return
        if trainer.state.epoch < trainer.state.max_epochs and elapsed + self.longest_epoch > self.seconds:
            logger.info("time budget: stopping after epoch %d (%.0f s of %.0f s used, an epoch takes up to %.0f s)",
                        trainer.state.epoch, elapsed, self.seconds, self.longest_epoch)
            self.stopped = True
            trainer.terminate()

    def elapsed(self) -> float:
        """Seconds since the trainer started (0 before)."""
        return 0.0 if self.started is None else time.perf_counter() - self.started

    def progress(self) -> float:
        """The fraction of the budget used, in [0, 1]; 0 without a budget. In a DDP run, the time all ranks agreed
        on at the last epoch's end, so that every rank uses the same learning rate."""
        if self.seconds is None:
            return 0.0
        elapsed = self.agreed_elapsed if _distributed() else self.elapsed()
        return min(elapsed / self.seconds, 1.0)

    @property
    def stopped_by(self) -> str:
        if self.stopped:
            return "time_budget"
        state = self.trainer.state if self.trainer is not None else None
        return "early_stopping" if state is not None and state.epoch < state.max_epochs else "max_epochs"


class WarmupCosineWithinBudget(torch.optim.lr_scheduler.LambdaLR):
    """Linear warm-up over ``warmup_steps``, then a cosine from the base learning rate to 0, as MONAI's
    ``WarmupCosineSchedule`` (half a cycle over ``t_total`` steps), driven by whichever is further along: the
    steps (``(step - warmup_steps) / (t_total - warmup_steps)``) or the wall time of ``budget``
    (:meth:`TimeBudget.progress`). Without a budget it is MONAI's schedule."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, t_total: int,
                 budget: TimeBudget | None = None, last_epoch: int = -1) -> None:
        self.warmup_steps, self.t_total, self.budget = int(warmup_steps), int(t_total), budget
        super().__init__(optimizer, self.factor, last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        progress = (step - self.warmup_steps) / max(1, self.t_total - self.warmup_steps)
        if self.budget is not None:
            progress = max(progress, self.budget.progress())
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


class MetricsJSONWriter:
    """Appends each validation's metrics to a JSON list: ``{"epoch", "pixel_ap", "sample_ap", "loss", ...}``.

    ``names`` maps the evaluator's metric names to the record's keys; ``extra`` (e.g. dataset and fold) is
    added to every record, so runs of several folds can share one file. The epoch is the trainer's (0 for
    the validation before training).
    """

    def __init__(
        self, path: str | Path, names: dict[str, str], extra: dict | None = None, trainer: Engine | None = None
    ) -> None:
        self.path = Path(path)
        self.trainer = trainer
        self.names = dict(names)
        self.extra = dict(extra or {})

    def set_trainer(self, trainer: Engine) -> None:
        """The trainer whose epoch labels each record (set after both engines exist)."""
        self.trainer = trainer

    def attach(self, evaluator: Engine) -> None:
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, evaluator: Engine) -> None:
        epoch = self.trainer.state.epoch if self.trainer is not None else evaluator.state.epoch
        record = {"epoch": int(epoch), **self.extra}
        for source, target in self.names.items():
            value = evaluator.state.metrics.get(source)
            record[target] = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # folds trained at once share the file: one writer at a time, and a stop leaves the old file or the new
        with open(self.path.parent / f".{self.path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            records = json.loads(self.path.read_text()) if self.path.is_file() else []
            records.append(record)
            text = json.dumps(records, indent=1) + "\n"
            write_atomically(self.path, lambda tmp: tmp.write_text(text))
        logger.info("validation at epoch %d: %s", record["epoch"], {k: record[k] for k in self.names.values()})
