"""Small file helpers shared by training, inference and the tools: the suffixes of scans and fold models, and a
JSON writer that never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

__all__ = ["MODEL_SUFFIXES", "SCAN_SUFFIXES", "bundle_configs", "is_scan", "load_json", "save_json"]

SCAN_SUFFIXES = (".nii.gz", ".nii")
# file suffix of one fold model per ``model_format`` (the exports are made by ``scripts.export`` / ``make export``)
MODEL_SUFFIXES = {"pytorch": ".pt", "torchscript": ".ts", "onnx": ".onnx"}


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


def save_json(obj, path: str | os.PathLike) -> Path:
    """Write ``obj`` (a JSON-able object or a dataclass) to ``path`` atomically: a reader sees the old file or
    the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    text = json.dumps(obj, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_json(path: str | os.PathLike):
    """The JSON object in ``path``; a ValueError that names the file when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from err
