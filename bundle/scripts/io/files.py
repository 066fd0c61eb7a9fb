"""Small file helpers shared by training, inference and the tools: the suffixes of scans and fold models, and a
JSON writer that never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

__all__ = ["BUNDLE_ROOT", "DATASETS", "MODEL_SUFFIXES", "MOOD_DATASETS", "SCAN_SUFFIXES", "bundle_configs", "is_scan",
           "load_json", "save_json", "write_atomically"]

# the bundle folder (configs/, models/, scripts/): where the bundle's own configs, metadata and models are found
BUNDLE_ROOT = Path(__file__).resolve().parents[2]
SCAN_SUFFIXES = (".nii.gz", ".nii")
# the datasets the bundle has an overlay for (configs/<dataset>.yaml): MOOD's two volumes, and chest radiographs
MOOD_DATASETS = ("brain", "abdom")
DATASETS = (*MOOD_DATASETS, "xray")
# file suffix of one fold model per ``model_format`` (the exports are made by ``scripts.export`` / ``make export``)
MODEL_SUFFIXES = {"pytorch": ".pt", "torchscript": ".ts", "onnx": ".onnx"}
# the process's umask, read once at import (os.umask can only be read by setting it, which is not thread-safe)
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def bundle_configs(bundle_root: str | os.PathLike, workflow: str, dataset: str, *extra: str) -> list[str]:
    """The config files of a workflow (``train`` or ``inference``) for one dataset, in the order they are read:
    ``common.yaml``, the workflow's file, the dataset overlay, then any ``extra`` overlays (e.g.
    ``multi_gpu_train.yaml``)."""
    if workflow not in ("train", "inference"):
        raise ValueError(f"workflow must be 'train' or 'inference', got {workflow!r}")
    configs = Path(bundle_root) / "configs"
    files = [configs / "common.yaml", configs / f"{workflow}.yaml", configs / f"{dataset}.yaml",
             *(configs / e for e in extra)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"missing bundle config {missing[0]!r} (dataset {dataset!r})")
    return [str(f) for f in files]


def is_scan(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named like a NIfTI scan (``*.nii.gz``, ``*.nii``, any case)."""
    return Path(path).name.lower().endswith(SCAN_SUFFIXES)


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None], replace: bool = True) -> Path:
    """Write ``path`` through ``write(temporary path)``, then move the finished file into place: a stop or a full
    disk mid-write leaves the old file or none, never a truncated one. The temporary file sits in the same folder
    (the move is atomic) and keeps the suffix (nibabel chooses compression by it). ``replace=False`` creates
    ``path`` only if it does not exist yet (a hard link; FileExistsError otherwise), so of several writers at once
    exactly one wins."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=suffix, dir=path.parent)
    # mkstemp makes the file private (0600); the result gets the mode of any file the process creates, so a map
    # written by the container's root stays readable to the folder's owner
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    try:
        write(Path(tmp))
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def save_json(obj, path: str | os.PathLike, replace: bool = True) -> Path:
    """Write ``obj`` (a JSON-able object or a dataclass) to ``path`` with :func:`write_atomically`."""
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    text = json.dumps(obj, indent=2) + "\n"
    return write_atomically(path, lambda tmp: tmp.write_text(text), replace)


def load_json(path: str | os.PathLike):
    """The JSON object in ``path``; a ValueError that names the file when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from err
