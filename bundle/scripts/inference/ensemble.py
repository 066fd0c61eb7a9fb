"""The fold ensemble: every fold model of a dataset, loaded from its state dict (into the network the plan
defines) or from its TorchScript or ONNX export, averaged as anomaly probabilities."""

from __future__ import annotations

import copy
import logging
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.data import MetaTensor

from scripts.io.files import MODEL_SUFFIXES, load_json
from scripts.networks import SliceWiseNetwork
from scripts.plans import PLAN_FILE

__all__ = ["Ensemble", "OnnxNetwork", "check_folds", "load_ensemble", "load_fold", "load_weights", "model_files",
           "wrap_like"]

logger = logging.getLogger(__name__)


class Ensemble(torch.nn.Module):
    """Mean of the sigmoid outputs of the fold models: anomaly probabilities in [0, 1].

    ``flip_axes`` (spatial axes of the input, e.g. ``(0,)`` for left-right on the RAS working grid): test-time
    flips, each fold's map is also computed on the input flipped along each of these axes, flipped back and
    averaged in (1 + len(flip_axes) passes per fold).
    """

    def __init__(self, networks: Sequence[torch.nn.Module], flip_axes: Sequence[int] = ()) -> None:
        super().__init__()
        if not networks:
            raise ValueError("an ensemble needs at least one network")
        self.networks = torch.nn.ModuleList(networks)
        self.flip_axes = tuple(int(a) for a in flip_axes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.ndim - 2
        if any(not 0 <= a < spatial for a in self.flip_axes):
            raise ValueError(f"flip_axes {self.flip_axes} must be spatial axes 0..{spatial - 1}")
        views = [()] + [(a + 2,) for a in self.flip_axes]  # the input's dims to flip, for each pass
        total = None
        for network in self.networks:
            for dims in views:
                p = torch.sigmoid(network(x.flip(dims) if dims else x).float())
                p = p.flip(dims) if dims else p
                total = p if total is None else total + p
        return total / (len(self.networks) * len(views))


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


def wrap_like(network_def: torch.nn.Module, exported: torch.nn.Module) -> torch.nn.Module:
    """An export as ``network_def`` runs it: a slice-wise model's export is its 2D network alone, so it goes back into
    a :class:`scripts.networks.SliceWiseNetwork` with ``network_def``'s settings; any other export as it is."""

    if not isinstance(network_def, SliceWiseNetwork):
        return exported
    return SliceWiseNetwork(exported, network_def.slice_axis, network_def.foreground_fraction, network_def.slice_batch)


def load_fold(network_def: torch.nn.Module, path: Path, model_format: str, device="cpu") -> torch.nn.Module:
    """One fold model as ``network_def`` runs it: its export (``torchscript``, ``onnx``; :func:`wrap_like`) or its
    state dict loaded into a copy of ``network_def`` (``pytorch``)."""
    if model_format == "torchscript":
        return wrap_like(network_def, torch.jit.load(str(path), map_location="cpu"))
    if model_format == "onnx":
        return wrap_like(network_def, OnnxNetwork(path, device))
    return load_weights(copy.deepcopy(network_def), path,
                        f"the network of its folder's {PLAN_FILE} (was it trained into another folder, or its plan "
                        "replaced?)")


def load_weights(network: torch.nn.Module, path: str | Path, expected: str = "the network") -> torch.nn.Module:
    """Load the plain state dict ``path`` into ``network`` (in place) and return it. Anything but tensors and
    plain containers is refused (``weights_only``: loading it would run code); a state dict that does not fit
    is an error naming the file and ``expected``, the network it should have fitted."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"model {str(path)!r} is refused: it is not a plain state dict of tensors (loading it would "
                         "run code it carries); use the state dicts training writes") from None
    except Exception as err:
        raise ValueError(f"model {str(path)!r} cannot be read: {type(err).__name__}: {err}") from err
    try:
        network.load_state_dict(state)
    except Exception as err:
        raise ValueError(f"model {str(path)!r} does not fit {expected}: {err}") from err
    return network


def check_folds(files: Sequence[Path], plan: dict | None, allow_partial: bool = False) -> None:
    """The ensemble is the one the plan trained: every model fold of its split, none missing, unless
    ``allow_partial``; folds that ``summary.json`` lists as failed are named in the log."""
    folder = files[0].parent
    summary = folder / "summary.json"
    if summary.is_file():
        failed = load_json(summary).get("failed_folds") or []
        if failed:
            logger.warning("%s lists failed folds %s: their models, if any, may be unfinished", summary, failed)
    split = (plan or {}).get("split")
    if not split:
        return
    expected = {f"fold_{f['fold']}" for f in split["model_folds"]}
    missing = sorted(expected - {p.stem for p in files})
    if missing and not allow_partial:
        raise ValueError(f"{str(folder)!r} holds {len(expected) - len(missing)} of the {len(expected)} fold models its "
                         f"plan trained ({', '.join(missing)} missing): finish training them, or pass "
                         "--allow_partial_ensemble (monai.bundle run: --allow_partial_ensemble true) to score with "
                         "the folds there are")
    if missing:
        logger.warning("a partial ensemble: %s missing from %s", ", ".join(missing), folder)


def load_ensemble(network_def: torch.nn.Module, models_dir: str | Path, dataset: str, device,
                  model_format: str = "pytorch", plan: dict | None = None,
                  allow_partial: bool = False, flip_axes: Sequence[int] = ()) -> torch.nn.Module:
    """Every fold model of ``models_dir/<dataset>`` as one :class:`Ensemble` in eval mode on ``device``:
    plain state dicts ``fold_<k>.pt`` loaded into copies of ``network_def`` (``model_format='pytorch'``), or
    their exports ``fold_<k>.ts`` (TorchScript) or ``fold_<k>.onnx`` (onnxruntime). With the models' ``plan``,
    an ensemble missing some of the plan's folds is refused unless ``allow_partial`` (:func:`check_folds`).
    ``flip_axes``: test-time flips (:class:`Ensemble`). A plan of voxel classifiers gives their fold ensemble
    (:func:`scripts.classifier.model.load_classifier`; they have no exports: their own files in any format), and a
    plan of both their fusion (:class:`scripts.classifier.fusion.FusedEnsemble`)."""
    classifier = None
    if plan is not None and plan.get("classifier"):
        from scripts.classifier.model import load_classifier

        classifier = load_classifier(models_dir, dataset, plan, allow_partial).to(device)
        if plan.get("network") is None:
            return classifier
    files = model_files(models_dir, dataset, model_format)
    check_folds(files, plan, allow_partial)
    networks = []
    for path in files:
        state_dict = path.with_suffix(MODEL_SUFFIXES["pytorch"])
        if model_format != "pytorch" and state_dict.is_file() and state_dict.stat().st_mtime > path.stat().st_mtime:
            logger.warning("%s is older than %s: re-export with 'make export'", path, state_dict.name)
        networks.append(load_fold(network_def, path, model_format, device))
    logger.info("ensemble of %d %s fold models from %s", len(networks), model_format, Path(models_dir) / dataset)
    ensemble = Ensemble(networks, flip_axes).to(device).eval()
    if classifier is None:
        return ensemble
    from scripts.classifier.fusion import FusedEnsemble

    fusion = plan.get("fusion") or {}
    return FusedEnsemble(classifier, ensemble, fusion.get("method"), fusion.get("classifier_weight")).eval()
