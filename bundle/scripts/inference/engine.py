"""The per-case inference machinery: the argument checks, the dataset that turns an unreadable scan into an item
with its reason, the prefetching loader and the engine that passes such items to the writers without running the
network. :class:`scripts.inference.predictor.Predictor` puts them together."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.data import DataLoader
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents

from scripts.cli import describe_error
from scripts.io.cases import DEFAULT_MAX_VOXELS, check_scan, readable_path
from scripts.io.keys import ERROR, NAME, PATH, identity_of
from scripts.io.nifti import read_tolerantly

logger = logging.getLogger(__name__)


# what a run writes: pixel maps, sample scores, or both from one pass of the ensemble
MODES = ("pixel", "sample", "both")


def check_arguments(dataset_dir, output_dir, mode: str, pixel_output_dir=None, sample_output_dir=None) -> None:
    """The checks before any work: one clear error for a missing argument, an unknown mode, an output folder that
    is a file, or a pixel output folder that is the input folder (the maps carry the scans' names and would
    replace them). ``pixel_output_dir`` and ``sample_output_dir`` default to ``output_dir``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not dataset_dir:
        raise ValueError("--dataset_dir (or --input_dir) is required: the folder of scans to score")
    folders = {"pixel": pixel_output_dir or output_dir, "sample": sample_output_dir or output_dir}
    written = ("pixel", "sample") if mode == "both" else (mode,)
    if not all(folders[kind] for kind in written):
        raise ValueError("--output_dir is required")
    if not Path(dataset_dir).is_dir():
        raise FileNotFoundError(f"input folder {str(dataset_dir)!r} does not exist or is not a folder")
    for kind in written:
        if Path(folders[kind]).exists() and not Path(folders[kind]).is_dir():
            raise ValueError(f"output folder {str(folders[kind])!r} exists and is not a folder")
    if "pixel" in written and Path(dataset_dir).resolve() == Path(folders["pixel"]).resolve():
        raise ValueError(f"output folder {str(folders['pixel'])!r} is the input folder: the pixel maps would replace "
                         "the scans (they carry the scans' names); choose another output folder")


class RobustDataset(torch.utils.data.Dataset):
    """Applies ``transform`` to each input item; a scan that cannot be read or preprocessed becomes an item
    with only its ``name``, ``image_path``, ``source``, ``series_uid`` and the ``error`` (the reason), so one bad
    file never stops the rest. Good items carry ``error = ""``."""

    def __init__(self, data: Sequence[dict], transform, max_voxels: int = DEFAULT_MAX_VOXELS) -> None:
        self.data = list(data)
        self.transform = transform
        self.max_voxels = max_voxels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.data[index])
        try:
            def load() -> dict:
                check_scan(item[PATH], self.max_voxels)
                return self.transform({**item, "image": readable_path(item[PATH])})

            out = read_tolerantly(load, item[NAME])
            image = out["image"]
            if not torch.isfinite(torch.as_tensor(image)).all():
                raise ValueError("non-finite intensities remain after preprocessing")
            out[ERROR] = ""
            return out
        except Exception as err:  # MemoryError included: this case fails, the others go on
            return {**identity_of(item), ERROR: describe_error(err)}


class PrefetchingDataLoader(DataLoader):
    """MONAI's ``DataLoader`` that loads the next batch in a background thread while the current one is scored, one
    batch ahead (so at most two cases are in memory). Unlike MONAI's ``ThreadDataLoader``, whose thread ends the
    iteration silently when it meets an error, an error in the thread is raised where the batch was asked for: the
    run stops with it instead of skipping the remaining cases. A thread, not worker processes: those need
    /dev/shm and short TMPDIR paths for their sockets."""

    def __iter__(self):
        batches = super().__iter__()
        handoff: queue.Queue = queue.Queue(maxsize=1)

        def load() -> None:
            try:
                for batch in batches:
                    handoff.put(("batch", batch))
                    handoff.join()  # until it is taken: the next one is loaded while it is scored, not earlier
                handoff.put(("end", None))
            except BaseException as err:  # handed to the consumer, which raises it
                handoff.put(("error", err))

        threading.Thread(target=load, name="case-loader", daemon=True).start()
        while True:
            kind, value = handoff.get()
            handoff.task_done()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value


def as_cases(batch: Sequence[dict]) -> list[dict]:
    """The loader's ``collate_fn``: the cases as they are (the Predictor collates each for its network pass)."""
    return list(batch)


class AnomalyInferenceEngine(Evaluator):
    """MONAI's Evaluator over the cases of a loader (:func:`as_cases`), each through the ``predictor``'s own steps
    (:meth:`Predictor.infer <scripts.inference.predictor.Predictor.infer>`, then ``postprocess``), which isolate
    every case: one that cannot be read, scored or written becomes a failed case (the writers write its fallback)
    and the run goes on with the next. The handlers (progress lines, worklist) see each iteration's finished cases
    as ``state.batch`` and ``state.output``; ``FORWARD_COMPLETED`` fires after the network pass."""

    def __init__(self, predictor, val_data_loader, val_handlers: Sequence | None = None) -> None:
        super().__init__(device=predictor.device, val_data_loader=val_data_loader, val_handlers=val_handlers,
                         amp=predictor.amp, decollate=False)
        self.predictor = predictor

    def _iteration(self, engine, batchdata: Sequence[dict]) -> list[dict]:
        cases = [engine.predictor.infer(case) for case in batchdata]
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.state.batch = engine.state.output = [engine.predictor.postprocess(case) for case in cases]
        return engine.state.output
