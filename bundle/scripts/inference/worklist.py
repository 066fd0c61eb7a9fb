"""The worklist of an inference run, for people reading scans rather than for MOOD's evaluator: ``scores.csv``, one
row per scan in the order they were scored, with the sample score, whether it is flagged at the chosen false-positive
rate, where the map peaks (scanner coordinates) and how much of the scan lies above the voxel threshold, and each
failed case with its reason. The thresholds are the models' operating points (``scripts.calibration``).

:class:`SummariseMapd` measures a case on its working-grid map (a post-processing step, before the map is brought
back to the input grid); :class:`WorklistWriter`, an Ignite handler, writes the table after every case, whole and
atomically, so a stopped run leaves the rows of the cases it finished."""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.io.files import write_atomically
from scripts.io.keys import ERROR, NAME, PATH
from scripts.scores import sample_score

__all__ = ["WORKLIST_COLUMNS", "SummariseMapd", "WorklistWriter", "read_worklist"]

logger = logging.getLogger(__name__)

WORKLIST_COLUMNS = ("name", "source", "series_uid", "status", "reason", "sample_score", "flag_fpr",
                    "sample_threshold", "flagged", "map_max", "max_x_mm", "max_y_mm", "max_z_mm", "voxel_fpr",
                    "voxel_threshold", "volume_above_ml", "seconds")


class SummariseMapd(MapTransform):
    """Adds what the worklist says of a case, from its map on the working grid (``pred``, channel first, a
    MetaTensor whose affine maps voxels to scanner coordinates): ``score`` (the sample score, as
    :class:`scripts.inference.writers.WriteSampleScored` computes it), ``map_max`` and ``max_location_mm`` (the
    centre of the map's highest voxel, RAS millimetres as NIfTI's world coordinates), ``flagged`` (the score above
    ``sample_threshold``, the score rounded as the .txt file holds it) and ``volume_above_ml`` (the volume of the
    foreground voxels, ``foreground_key``, above ``voxel_threshold``, the rate being one of foreground voxels); the
    last two are None without a threshold. Failed cases pass unchanged."""

    def __init__(self, keys: str = "pred", method: float | Mapping = 1e-2, sample_threshold: float | None = None,
                 voxel_threshold: float | None = None, foreground_key: str = "foreground",
                 allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.foreground_key = foreground_key
        self.method = method
        self.sample_threshold = sample_threshold
        self.voxel_threshold = voxel_threshold

    def __call__(self, data: Mapping[Hashable, object]) -> dict:

        d = dict(data)
        if d.get(ERROR):
            return d
        for key in self.key_iterator(d):
            pred = d[key]
            values = torch.nan_to_num(torch.as_tensor(pred).detach().float(), nan=0.0).clamp(0.0, 1.0)
            spatial = values[0] if values.ndim >= 3 and values.shape[0] == 1 else values  # channel first: drop it
            d["score"] = float(sample_score(spatial, self.method))
            peak = int(torch.argmax(spatial))
            d["map_max"] = float(spatial.reshape(-1)[peak])
            affine = np.asarray(pred.affine, dtype=np.float64) if isinstance(pred, MetaTensor) else np.eye(4)
            index = np.unravel_index(peak, tuple(spatial.shape))
            index = [*index, *[0] * (3 - len(index))]  # a 2D image's pixel: its plane is the first of the affine's
            d["max_location_mm"] = [float(c) for c in (affine @ np.array([*index, 1.0]))[:3]]
            # the score as the .txt file holds it, against a threshold set from scores recorded the same way
            d["flagged"] = None if self.sample_threshold is None else round(d["score"], 6) > self.sample_threshold
            if self.voxel_threshold is None:
                d["volume_above_ml"] = None
            else:
                above = spatial > self.voxel_threshold
                foreground = d.get(self.foreground_key)
                if foreground is not None:  # the voxel rate is one of foreground voxels: count those only
                    above &= torch.as_tensor(foreground).to(above.device).reshape(above.shape) > 0
                voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
                d["volume_above_ml"] = int(above.sum()) * voxel_ml
        return d


def _number(value, digits: int) -> str:
    return "" if value is None else f"{float(value):.{digits}f}"


def default_path(mode: str, pixel_output_dir: str | Path, sample_output_dir: str | Path) -> str:
    """Where the worklist goes by default: ``scores.csv`` beside the scores (the maps in pixel mode)."""
    return str(Path(pixel_output_dir if mode == "pixel" else sample_output_dir) / "scores.csv")


class WorklistWriter:
    """Writes ``path`` (``scores.csv``, :data:`WORKLIST_COLUMNS`) after every case, the whole table each time through
    a temporary file, so it is never half-written. ``operating_point`` is
    :func:`scripts.inference.operating_points.operating_point`'s. ``path`` empty or None: no worklist (the MOOD run
    scripts)."""

    def __init__(self, path: str | Path | None, operating_point: Mapping | None = None) -> None:
        self.path = Path(path) if path else None
        self.point = dict(operating_point or {})
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        if self.path is None:
            return
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._case_start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._case_done)

    def _start(self, engine: Engine) -> None:
        self.rows = []
        self._write()  # the header alone: an earlier run's rows never pass for this run's

    def _case_start(self, engine: Engine) -> None:
        self.case_t0 = time.perf_counter()

    def _row(self, item: Mapping, seconds: float) -> dict:
        failed = bool(item.get(ERROR))
        location = item.get("max_location_mm") or [None] * 3
        threshold = self.point.get("sample_threshold")
        flagged = item.get("flagged")
        if failed:  # a scan that could not be scored is one to look at
            flagged = True if threshold is not None else None
        return {
            "name": item.get(NAME, ""),
            "source": item.get("source") or Path(item.get(PATH, "")).name,
            "series_uid": item.get("series_uid", ""),
            "status": "failed" if failed else "ok",
            "reason": item.get(ERROR, "") or "",
            "sample_score": _number(item.get("score"), 6),
            "flag_fpr": _number(self.point.get("flag_fpr"), 4) if threshold is not None else "",
            "sample_threshold": _number(threshold, 6),
            "flagged": "" if flagged is None else ("yes" if flagged else "no"),
            "map_max": _number(item.get("map_max"), 6),
            "max_x_mm": _number(location[0], 1),
            "max_y_mm": _number(location[1], 1),
            "max_z_mm": _number(location[2], 1),
            "voxel_fpr": _number(self.point.get("voxel_fpr"), 6) if self.point.get("voxel_threshold") is not None
            else "",
            "voxel_threshold": _number(self.point.get("voxel_threshold"), 6),
            "volume_above_ml": _number(item.get("volume_above_ml"), 3),
            "seconds": _number(seconds if not failed else None, 1),
        }

    def _case_done(self, engine: Engine) -> None:
        seconds = time.perf_counter() - self.case_t0
        batch, output = engine.state.batch, engine.state.output
        batch, output = (batch, output) if isinstance(batch, list) else ([batch], [output])
        for part, result in zip(batch, output):
            self.rows.append(self._row({**part, **(result if isinstance(result, Mapping) else {})}, seconds))
        self._write()

    def _write(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=WORKLIST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        try:
            write_atomically(self.path, lambda tmp: tmp.write_text(text.getvalue(), encoding="utf-8"))
        except OSError as err:  # the worklist is a convenience: the MOOD outputs of the case are written already
            logger.error("the worklist %s could not be written: %s", self.path, err)


def read_worklist(path: str | Path) -> list[dict]:
    """The rows of a ``scores.csv`` as dicts of strings."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
