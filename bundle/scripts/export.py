"""Export every fold model to TorchScript and ONNX with MONAI's bundle exporters, and check the exports.

For each ``models_dir/<dataset>/fold_<k>.pt`` (plain state dict) this runs ``monai.bundle.ckpt_export`` (TorchScript,
``fold_<k>.ts``) and ``monai.bundle.onnx_export`` (ONNX, ``fold_<k>.onnx``) on the bundle's ``network_def`` from
``common.yaml`` + ``inference.yaml`` + the dataset overlay (the network of the models' own plan), exactly as the
command-line forms do::

    python -m monai.bundle ckpt_export network_def --filepath fold_0.ts --ckpt_file fold_0.pt --key_in_ckpt "" \\
        --meta_file bundle/configs/metadata.json --models_dir bundle/models \\
        --config_file "['bundle/configs/common.yaml','bundle/configs/inference.yaml','bundle/configs/brain.yaml']"

then runs the state dict and both exports on the same probe volume at the models' working grid and records the
largest absolute difference of the anomaly maps (the sigmoid of the logits, what inference averages) and of the
logits in ``models_dir/<dataset>/export.json``; and the ensemble's map of the probe as inference makes it (the
inference config's Predictor, ``--model_format`` each format, on the CPU) against the state dicts'. A map
difference above the tolerance (1e-4) is an error.
Inference uses the exports with ``--model_format torchscript`` or ``onnx``.

Slice-wise models (a plan with ``slice_axis``): the export is the 2D network alone (``network_2d_def``, its state dict
without the wrapper's ``network.`` prefix), on (B, C, H, W) slices; the slice loop, which picks the slices with
foreground by their content, stays in Python (:class:`scripts.networks.SliceWiseNetwork`), and the ensemble puts
each loaded export back inside it. The check still runs the whole path on the probe volume, slice loop included.

    python -m scripts.export --models_dir bundle/models [--datasets brain abdom] [--formats torchscript onnx]
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ckpt_export, onnx_export
from scipy import ndimage as ndi

from scripts.inference.ensemble import load_fold, model_files
from scripts.inference.predictor import Predictor, bundle_config
from scripts.io.files import MODEL_SUFFIXES, bundle_configs, save_json
from scripts.networks import build_network
from scripts.plans import load_plan

__all__ = ["EXPORT_FORMATS", "ONNX_CONVERTER_KWARGS", "export_dataset", "export_fold", "onnx_converter_kwargs",
           "probe_volume"]

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("torchscript", "onnx")
TOLERANCE = 1e-4
# The TorchScript-based ONNX exporter (dynamo=False): the dynamo one would add onnxscript to the pinned
# dependencies. Batch and spatial axes stay dynamic, so one file serves any working grid.
def onnx_converter_kwargs(spatial_dims: int = 3) -> dict:
    """``onnx_export``'s converter arguments for a network of ``spatial_dims`` (3: volumes, 2: a slice-wise model's
    2D network)."""
    dynamic = {0: "batch", **{2 + i: axis for i, axis in enumerate("xyz"[:spatial_dims])}}
    return {"dynamo": False, "input_names": ["image"], "output_names": ["pred"],
            "dynamic_axes": {"image": dict(dynamic), "pred": dict(dynamic)}}


ONNX_CONVERTER_KWARGS = onnx_converter_kwargs(3)


def probe_volume(spatial_size: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A deterministic smooth random volume with zero mean and unit variance (like a normalised scan), shaped
    ``(1, 1, *spatial_size)``: the input on which exports are compared with the state dict."""
    noise = np.random.default_rng(seed).standard_normal(tuple(spatial_size))
    smooth = ndi.gaussian_filter(noise, sigma=2.0) + 0.2 * noise
    smooth = (smooth - smooth.mean()) / smooth.std()
    return torch.from_numpy(smooth.astype(np.float32))[None, None]


def export_fold(state_dict: str | Path, formats: Sequence[str], configs: Sequence[str], meta_file: str | Path,
                spatial_size: Sequence[int], slice_axis: int | None = None) -> dict[str, Path]:
    """Write the exports of one fold next to its state dict (``<models_dir>/<dataset>/fold_<k>.pt``, whose plan
    defines the network); returns ``{format: path}``. ``slice_axis`` (a slice-wise plan's): export the 2D network on
    slices of ``spatial_size`` cut along that axis."""
    state_dict = Path(state_dict)
    for fmt in formats:
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"export formats are {EXPORT_FORMATS}, got {fmt!r}")
    with tempfile.TemporaryDirectory() as scratch:
        net_id, ckpt_file, input_size = "network_def", state_dict, list(spatial_size)
        if slice_axis is not None:  # the wrapper's state dict, as the 2D network's
            net_id, ckpt_file = "network_2d_def", Path(scratch) / state_dict.name
            state = torch.load(state_dict, map_location="cpu", weights_only=True)
            stray = [k for k in state if not k.startswith("network.")]
            if stray:  # MONAI's exporter would skip keys that do not fit, silently, leaving untrained weights
                raise ValueError(f"{str(state_dict)!r} is not a slice-wise model's state dict (keys {stray[:3]} are "
                                 "not its 2D network's)")
            torch.save({k.removeprefix("network."): v for k, v in state.items()}, ckpt_file)
            del input_size[slice_axis]
        common = {"net_id": net_id, "ckpt_file": str(ckpt_file), "meta_file": str(meta_file),
                  "config_file": list(configs), "key_in_ckpt": "", "models_dir": str(state_dict.parent.parent),
                  "dataset_name": state_dict.parent.name}
        written = {}
        for fmt in formats:
            target = state_dict.with_suffix(MODEL_SUFFIXES[fmt])
            if fmt == "torchscript":
                ckpt_export(filepath=str(target), **common)
            else:
                onnx_export(filepath=str(target), use_trace=True, input_shape=[1, 1, *input_size],
                            converter_kwargs=onnx_converter_kwargs(len(input_size)), **common)
            written[fmt] = target
    return written


def _run_export(fmt: str, path: Path, x: torch.Tensor, network_def: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return load_fold(network_def, path, fmt).eval()(x)  # as inference loads it


def _ensemble_differences(models_dir: str | Path, dataset: str, formats: Sequence[str], bundle_root: str | Path,
                          x: torch.Tensor) -> dict[str, float]:
    """The largest difference between the ensemble's map of ``x`` from each format's files and from the state
    dicts, each made by the inference config's Predictor (``model_format``) on the CPU."""
    maps = {}
    for fmt in ("pytorch", *formats):
        parser = bundle_config(dataset, models_dir, bundle_root, model_format=fmt, device="$torch.device('cpu')",
                               amp=False, allow_partial_ensemble=True)  # the folds there are, as exported
        maps[fmt] = Predictor.for_maps(parser).predict_map(x)
    return {fmt: float((maps[fmt] - maps["pytorch"]).abs().max()) for fmt in formats}


def export_dataset(models_dir: str | Path, dataset: str, formats: Sequence[str] = EXPORT_FORMATS,
                   bundle_root: str | Path = "bundle", tolerance: float = TOLERANCE) -> dict:
    """Export every fold of ``models_dir/<dataset>`` and compare each export's anomaly map with its state dict's
    on :func:`probe_volume`; writes and returns the record (``export.json``). Raises ValueError when a map
    differs by more than ``tolerance``."""
    configs = bundle_configs(bundle_root, "inference", dataset)
    meta_file = Path(bundle_root) / "configs" / "metadata.json"
    plan = load_plan(models_dir, dataset)
    if plan["network"] is None:
        raise ValueError(f"the {dataset!r} models in {str(models_dir)!r} are voxel classifiers: they have no export "
                         "(inference reads their LightGBM text models in every model_format)")
    network_def = build_network(plan)
    spatial_size = list(plan["spatial_size"])
    x = probe_volume(spatial_size)
    record = {"dataset": dataset, "spatial_size": spatial_size, "slice_axis": plan.get("slice_axis"),
              "tolerance": tolerance, "folds": {}}
    for state_dict in model_files(models_dir, dataset, "pytorch"):
        t0 = time.perf_counter()
        written = export_fold(state_dict, formats, configs, meta_file, spatial_size, plan.get("slice_axis"))
        network = copy.deepcopy(network_def)
        network.load_state_dict(torch.load(state_dict, map_location="cpu", weights_only=True))
        with torch.no_grad():
            reference = network.eval()(x)
        fold = {}
        for fmt, path in written.items():
            logits = _run_export(fmt, path, x, network_def)
            fold[fmt] = {"file": path.name,
                         "max_abs_diff": float((torch.sigmoid(logits) - torch.sigmoid(reference)).abs().max()),
                         "max_abs_logit_diff": float((logits - reference).abs().max())}
        record["folds"][state_dict.stem] = fold
        logger.info("%s/%s exported in %.1f s: %s", dataset, state_dict.stem, time.perf_counter() - t0,
                    {fmt: f"{v['max_abs_diff']:.2e}" for fmt, v in fold.items()})
    record["ensemble_max_abs_diff"] = _ensemble_differences(models_dir, dataset, formats, bundle_root, x)
    record["max_abs_diff"] = {fmt: max([f[fmt]["max_abs_diff"] for f in record["folds"].values()]
                                       + [record["ensemble_max_abs_diff"][fmt]]) for fmt in formats}
    save_json(record, Path(models_dir) / dataset / "export.json")
    bad = {fmt: d for fmt, d in record["max_abs_diff"].items() if not d <= tolerance}
    if bad:
        raise ValueError(f"exports of {dataset!r} differ from the state dicts by more than {tolerance}: {bad}")
    return record


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models_dir", default="bundle/models")
    parser.add_argument("--datasets", nargs="*", default=None,
                        help="default: every subfolder of models_dir that holds fold_<k>.pt")
    parser.add_argument("--formats", nargs="+", default=list(EXPORT_FORMATS), choices=EXPORT_FORMATS)
    parser.add_argument("--bundle_root", default="bundle")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    models_dir = Path(args.models_dir)
    datasets = args.datasets or sorted(p.name for p in models_dir.iterdir() if p.is_dir() and any(p.glob("fold_*.pt")))
    if not datasets:
        raise SystemExit(f"no fold_<k>.pt models under {str(models_dir)!r}")
    records = {}
    for dataset in datasets:
        records[dataset] = export_dataset(models_dir, dataset, args.formats, args.bundle_root)
        print(f"{dataset}: {len(records[dataset]['folds'])} folds exported to {args.formats}; max |difference| "
              + ", ".join(f"{fmt} {d:.1e}" for fmt, d in records[dataset]["max_abs_diff"].items()), flush=True)
    return records


if __name__ == "__main__":
    main()
