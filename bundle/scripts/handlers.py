"""Ignite handlers the training config attaches next to MONAI's own."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from ignite.engine import Engine, Events

__all__ = ["ExtraValidation", "MetricsJSONWriter"]

logger = logging.getLogger(__name__)


class ExtraValidation:
    """Validation outside MONAI's ``ValidationHandler`` schedule: before training (the baseline of the
    untrained network) and after the last epoch when it is not a multiple of ``interval``."""

    def __init__(self, validator, interval: int, at_start: bool = True, at_end: bool = True) -> None:
        self.validator = validator
        self.interval = interval
        self.at_start = at_start
        self.at_end = at_end

    def attach(self, trainer: Engine) -> None:
        if self.at_start:
            trainer.add_event_handler(Events.STARTED, self._start)
        if self.at_end:
            trainer.add_event_handler(Events.COMPLETED, self._end)

    def _start(self, trainer: Engine) -> None:
        self.validator.run(1)  # evaluator bookkeeping wants a positive epoch; the writer records epoch 0

    def _end(self, trainer: Engine) -> None:
        # epochs that are multiples of the interval were validated already (early stopping also only
        # triggers right after such a validation)
        if trainer.state.epoch % self.interval != 0:
            self.validator.run(trainer.state.epoch)


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
        records = json.loads(self.path.read_text()) if self.path.is_file() else []
        records.append(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(records, indent=1) + "\n")
        logger.info("validation at epoch %d: %s", record["epoch"], {k: record[k] for k in self.names.values()})
