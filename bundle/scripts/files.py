"""Small file helpers shared by training, inference and the tools: the suffixes of scans and fold models, and a
JSON writer that never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

__all__ = ["MODEL_SUFFIXES", "SCAN_SUFFIXES", "is_scan", "load_json", "save_json"]

SCAN_SUFFIXES = (".nii.gz", ".nii")
# file suffix of one fold model per ``model_format`` (the exports are made by ``scripts.export`` / ``make export``)
MODEL_SUFFIXES = {"pytorch": ".pt", "torchscript": ".ts", "onnx": ".onnx"}


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
