"""Inference on new scans: the argument checks, input discovery that never loses a case, the dataset that turns
an unreadable scan into an item with its reason, and the engine that passes such items to the writers
(``scripts.postprocessing``) without running the network (the ensemble is in ``scripts.ensemble``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import torch
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents

from scripts.files import is_scan

__all__ = ["AnomalyInferenceEngine", "RobustDataset", "check_arguments", "list_inputs"]

logger = logging.getLogger(__name__)

# keys of every case item: the file name, its path, and why it could not be scored ("" when it could)
NAME, PATH, ERROR = "name", "image_path", "error"


MODES = ("pixel", "sample")


def check_arguments(dataset_dir, output_dir, mode: str) -> None:
    """The checks before any work: one clear error for a missing argument or an unknown mode."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not dataset_dir:
        raise ValueError("--dataset_dir (or --input_dir) is required: the folder of scans to score")
    if not output_dir:
        raise ValueError("--output_dir is required")


def list_inputs(input_dir: str | Path) -> list[dict]:
    """One item per NIfTI file in ``input_dir`` (``name``, ``image_path``, ``image``), sorted by name.

    Other files are named in the log and skipped. A missing folder or one without any NIfTI file is an
    error (the bundle run then exits non-zero).
    """
    folder = Path(input_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder {str(folder)!r} does not exist or is not a folder")
    items = []
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if not is_scan(path):
            logger.warning("skipping %r: not a NIfTI file (*.nii.gz, *.nii)", path.name)
            continue
        items.append({NAME: path.name, PATH: str(path), "image": str(path)})
    if not items:
        raise ValueError(f"input folder {str(folder)!r} holds no *.nii.gz or *.nii scans")
    return items


def _check_scan(path: str) -> None:
    """Raise ValueError with the reason when ``path`` is not a readable 3D NIfTI volume."""
    try:
        image = nib.load(path)
    except Exception as err:  # nibabel raises many types for corrupt or empty files
        raise ValueError(f"not a readable NIfTI file ({type(err).__name__}: {err})") from err
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        return
    if len(shape) != 3:
        raise ValueError(f"not a 3D volume: shape {shape}")
    if min(shape) < 2:
        raise ValueError(f"degenerate 3D volume: shape {shape}")


class RobustDataset(torch.utils.data.Dataset):
    """Applies ``transform`` to each input item; a scan that cannot be read or preprocessed becomes an item
    with only its ``name``, ``image_path`` and the ``error`` (the reason), so one bad file never stops the rest.
    Good items carry ``error = ""``."""

    def __init__(self, data: Sequence[dict], transform) -> None:
        self.data = list(data)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.data[index])
        try:
            _check_scan(item[PATH])
            out = self.transform(item)
            image = out["image"]
            if not torch.isfinite(torch.as_tensor(image)).all():
                raise ValueError("non-finite intensities remain after preprocessing")
            out[ERROR] = ""
            return out
        except Exception as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if "applying transform" in reason and err.__cause__ is not None:  # MONAI wraps the real cause
                reason = str(err.__cause__).strip().splitlines()[0] or type(err.__cause__).__name__
            return {NAME: item[NAME], PATH: item[PATH], ERROR: reason}


class AnomalyInferenceEngine(SupervisedEvaluator):
    """A SupervisedEvaluator that passes failed items (``error`` set) straight to the postprocessing
    without running the network, so the writers can log them and write fallbacks."""

    def _iteration(self, engine, batchdata):
        errors = batchdata.get(ERROR) if isinstance(batchdata, Mapping) else None
        if errors is not None and any(errors):
            engine.state.output = {"failed": torch.ones(len(errors))}
            # decollation and postprocessing (the writers) run on this event, as after a forward pass
            engine.fire_event(IterationEvents.MODEL_COMPLETED)
            return engine.state.output
        return super()._iteration(engine, batchdata)


