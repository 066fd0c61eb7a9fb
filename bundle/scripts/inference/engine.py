"""The per-case inference machinery: the argument checks, the dataset that turns an unreadable scan into an item
with its reason, the prefetching loader and the engine that passes such items to the writers without running the
network. :class:`scripts.inference.predictor.Predictor` puts them together."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents

from scripts.cli import describe_error
from scripts.io.cases import DEFAULT_MAX_VOXELS, check_scan, readable_path
from scripts.io.keys import ERROR, IDENTITY, NAME, PATH, identity_of
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


class AnomalyInferenceEngine(SupervisedEvaluator):
    """A SupervisedEvaluator that isolates every case: items that failed to load (``error`` set) go straight to
    the postprocessing without the network, so the writers log them and write fallbacks; a case whose network
    pass, inverse transform or writer raises becomes such an item too, and the run goes on with the next."""

    def _iteration(self, engine, batchdata):
        errors = batchdata.get(ERROR) if isinstance(batchdata, Mapping) else None
        if errors is not None and any(errors):
            return self._postprocess_failed(engine, batchdata)
        try:
            return super()._iteration(engine, batchdata)
        except Exception as err:
            reason = describe_error(err)
            failed = {key: list(batchdata[key]) for key in IDENTITY if key in batchdata}
            failed[ERROR] = [reason] * len(batchdata[NAME])
            logger.error("%s: scoring failed: %s", ", ".join(failed[NAME]), reason)
            try:
                return self._postprocess_failed(engine, failed)
            except Exception as again:  # even the fallback cannot be written (e.g. the name is too long)
                reason = f"{reason}; no fallback written either: {describe_error(again)}"
                logger.error("%s: %s", ", ".join(failed[NAME]), reason)
                engine.state.batch = [{**{key: values[i] for key, values in failed.items()}, ERROR: reason}
                                      for i in range(len(failed[NAME]))]
                engine.state.output = [{} for _ in failed[NAME]]
                return engine.state.output

    @staticmethod
    def _postprocess_failed(engine, batchdata):
        engine.state.batch = batchdata
        engine.state.output = {"failed": torch.ones(len(batchdata[ERROR]))}
        # decollation and postprocessing (the writers) run on this event, as after a forward pass
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
