"""Inference on new scans: input discovery that never loses a case, the fold ensemble, the engine that
skips unreadable scans, and the MOOD writers (pixel NIfTI maps, sample text scores) as MONAI-style
postprocessing transforms, plus a per-case progress reporter."""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.transforms import MapTransform

from scripts.files import SCAN_SUFFIXES
from scripts.metrics import sample_score

__all__ = [
    "AnomalyInferenceEngine",
    "Ensemble",
    "MODEL_SUFFIXES",
    "OnnxNetwork",
    "ProgressReporter",
    "RobustDataset",
    "WritePixelMapd",
    "WriteSampleScored",
    "list_inputs",
    "load_ensemble",
    "load_fingerprint",
    "trained_setting",
]

logger = logging.getLogger(__name__)

NAME, PATH, ERROR = "name", "image_path", "error"


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
        if not path.name.lower().endswith(SCAN_SUFFIXES):
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


class Ensemble(torch.nn.Module):
    """Mean of the sigmoid outputs of the fold models: anomaly probabilities in [0, 1]."""

    def __init__(self, networks: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        if not networks:
            raise ValueError("an ensemble needs at least one network")
        self.networks = torch.nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for network in self.networks:
            p = torch.sigmoid(network(x).float())
            total = p if total is None else total + p
        return total / len(self.networks)


# file suffix of one fold model per ``model_format`` (the exports are made by ``scripts.export`` / ``make export``)
MODEL_SUFFIXES = {"pytorch": ".pt", "torchscript": ".ts", "onnx": ".onnx"}


def model_files(models_dir: str | Path, dataset: str, model_format: str = "pytorch") -> list[Path]:
    """The fold models ``models_dir/<dataset>/fold_<k><suffix>`` of ``model_format``, in fold order."""
    if model_format not in MODEL_SUFFIXES:
        raise ValueError(f"model_format must be one of {sorted(MODEL_SUFFIXES)}, got {model_format!r}")
    suffix = MODEL_SUFFIXES[model_format]
    folder = Path(models_dir) / dataset
    files = sorted(folder.glob(f"fold_*{suffix}"), key=lambda p: (len(p.name), p.name))
    if not files:
        what = "trained models" if model_format == "pytorch" else f"{model_format} exports of the models"
        hint = ("train with 'make train' or pass --models_dir <run folder>/models" if model_format == "pytorch"
                else f"export the state dicts with 'make export MODELS={models_dir}'")
        raise FileNotFoundError(f"no {what} for {dataset!r}: no fold_<k>{suffix} in {str(folder)!r}; {hint}")
    return files


class OnnxNetwork(torch.nn.Module):
    """One exported fold run by onnxruntime, behind the ``nn.Module`` interface the ensemble expects.

    Uses the CUDA execution provider when ``device`` is a GPU and onnxruntime has it, else the CPU one."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        super().__init__()
        import onnxruntime

        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.path = str(path)
        self.session = onnxruntime.InferenceSession(self.path, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = x.as_tensor() if isinstance(x, MetaTensor) else x
        (out,) = self.session.run(None, {self.input_name: plain.detach().float().cpu().numpy()})
        out = torch.from_numpy(out).to(x.device)
        if isinstance(x, MetaTensor):  # keep the input's metadata, as torch layers do, for Invertd downstream
            out = MetaTensor(out)
            out.copy_meta_from(x)
        return out


def _load_fold(network_def: torch.nn.Module, path: Path, model_format: str, device) -> torch.nn.Module:
    if model_format == "torchscript":
        return torch.jit.load(str(path), map_location="cpu")
    if model_format == "onnx":
        return OnnxNetwork(path, device)
    network = copy.deepcopy(network_def)
    try:
        network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:
        raise ValueError(
            f"model {str(path)!r} does not fit the configured network (network_depth, network_base_filters, "
            f"network_max_filters must match its training): {err}"
        ) from err
    return network


def load_ensemble(network_def: torch.nn.Module, models_dir: str | Path, dataset: str, device,
                  model_format: str = "pytorch") -> Ensemble:
    """Every fold model of ``models_dir/<dataset>`` as one :class:`Ensemble` in eval mode on ``device``:
    plain state dicts ``fold_<k>.pt`` loaded into copies of ``network_def`` (``model_format='pytorch'``), or
    their exports ``fold_<k>.ts`` (TorchScript) or ``fold_<k>.onnx`` (onnxruntime)."""
    networks = []
    for path in model_files(models_dir, dataset, model_format):
        state_dict = path.with_suffix(MODEL_SUFFIXES["pytorch"])
        if model_format != "pytorch" and state_dict.is_file() and state_dict.stat().st_mtime > path.stat().st_mtime:
            logger.warning("%s is older than %s: re-export with 'make export'", path, state_dict.name)
        networks.append(_load_fold(network_def, path, model_format, device))
    logger.info("ensemble of %d %s fold models from %s", len(networks), model_format, Path(models_dir) / dataset)
    return Ensemble(networks).to(device).eval()


def trained_setting(models_dir: str | Path, dataset: str, key: str, default):
    """A setting the training recorded in ``fold_<k>.json`` (e.g. ``spatial_size``); ``default`` if none."""
    for path in sorted((Path(models_dir) / dataset).glob("fold_*.json")):
        record = json.loads(path.read_text())
        if key in record:
            return record[key]
    return default


def load_fingerprint(models_dir: str | Path, dataset: str) -> dict:
    path = Path(models_dir) / dataset / "fingerprint.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing: the {dataset} models were trained with the "
                                "'fingerprint' normalisation, which needs the training data's statistics")
    return json.loads(path.read_text())


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


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, MetaTensor):
        x = x.as_tensor()
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


class WritePixelMapd(MapTransform):
    """Writes ``<output_dir>/<input name>``: the anomaly map as a float32 NIfTI with the input file's shape
    and affine (MOOD pixel task). Expects the map already brought back to the input grid and clamped."""

    def __init__(self, keys: str = "pred", output_dir: str | Path = ".", allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if d.get(ERROR):
            logger.error("%s: no pixel map written: %s", d[NAME], d[ERROR])
            return d
        source = nib.load(d[PATH])
        for key in self.key_iterator(d):
            values = _to_numpy(d[key])
            if values.size != int(np.prod(source.shape)):
                raise ValueError(f"{d[NAME]}: map of shape {values.shape} does not fit the input's {source.shape}")
            values = np.clip(np.nan_to_num(values.reshape(source.shape), nan=0.0), 0.0, 1.0).astype(np.float32)
            header = source.header.copy()
            header.set_data_dtype(np.float32)
            header.set_slope_inter(1.0, 0.0)
            out = nib.Nifti1Image(values, source.affine, header)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            nib.save(out, self.output_dir / d[NAME])
            d["written"] = str(self.output_dir / d[NAME])
        return d


class WriteSampleScored(MapTransform):
    """Writes ``<output_dir>/<input name>.txt`` with one float in [0, 1] (MOOD sample task): the mean of the
    ``top_fraction`` highest voxels of the working-grid map (:func:`scripts.metrics.sample_score`, the same
    aggregation as training's validation). A scan that could not be read gets ``fallback_score``."""

    def __init__(self, keys: str = "pred", output_dir: str | Path = ".", top_fraction: float = 1e-2,
                 fallback_score: float = 1.0, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= fallback_score <= 1.0:
            raise ValueError(f"fallback_score must be in [0, 1], got {fallback_score}")
        self.output_dir = Path(output_dir)
        self.top_fraction = top_fraction
        self.fallback_score = fallback_score

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if d.get(ERROR):
            logger.error("%s: could not be read (%s); writing the fallback score %s", d[NAME], d[ERROR],
                         self.fallback_score)
            score = self.fallback_score
        else:
            key = self.first_key(d)
            values = torch.nan_to_num(torch.as_tensor(_to_numpy(d[key])), nan=0.0)
            score = float(sample_score(values, self.top_fraction).clamp(0.0, 1.0))
        if not math.isfinite(score):
            score = self.fallback_score
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"{d[NAME]}.txt"
        path.write_text(f"{score:.6f}\n")
        d["score"], d["written"] = score, str(path)
        return d


class ProgressReporter:
    """Prints one line per case (name, seconds, what was written or why it failed) and a summary line."""

    def __init__(self, total: int | None = None) -> None:
        self.total = total

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._case_start)  # includes waiting for the loader
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._case_done)
        engine.add_event_handler(Events.COMPLETED, self._summary)

    def _start(self, engine: Engine) -> None:
        self.done, self.failed, self.seconds, self.t0 = 0, [], [], time.perf_counter()
        self.total = self.total or len(engine.data_loader)

    def _case_start(self, engine: Engine) -> None:
        self.case_t0 = time.perf_counter()

    def _case_done(self, engine: Engine) -> None:
        elapsed = time.perf_counter() - self.case_t0
        batch, output = engine.state.batch, engine.state.output
        batch, output = (batch, output) if isinstance(batch, list) else ([batch], [output])
        for part, result in zip(batch, output):
            item = {**part, **(result if isinstance(result, Mapping) else {})}
            index = self.done + len(self.failed) + 1
            if item.get(ERROR):
                self.failed.append(item[NAME])
                print(f"[{index}/{self.total}] {item[NAME]}: FAILED: {item[ERROR]}", flush=True)
            else:
                self.done += 1
                self.seconds.append(elapsed)
                extra = f" score {item['score']:.4f}" if "score" in item else ""
                print(f"[{index}/{self.total}] {item[NAME]}: {elapsed:.1f} s{extra}", flush=True)

    def _summary(self, engine: Engine) -> None:
        per_case = sum(self.seconds) / len(self.seconds) if self.seconds else float("nan")
        print(f"summary: {self.done} done, {len(self.failed)} failed, {per_case:.1f} s per case, "
              f"{time.perf_counter() - self.t0:.1f} s in all" + (f"; failed: {self.failed}" if self.failed else ""),
              flush=True)
