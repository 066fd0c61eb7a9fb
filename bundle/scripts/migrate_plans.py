"""Plans for models trained before plans existed (bundle 0.5.0), made from what their folder holds: the
network read from a fold's state dict, the grid, normalisation and split from the fold records.

    python -m scripts.migrate_plans --models_dir OLD_RUN/models --dataset brain
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from scripts.data.splits import model_folds
from scripts.io.files import load_json
from scripts.networks import build_network
from scripts.plans import ensure_plan, make_plan, split_record


def network_spec_from_state_dict(state: Mapping[str, torch.Tensor]) -> dict:
    """The DynUNet definition (as the bundle's training configures it: instance norm, no deep supervision, no
    residual blocks, stride 2 below the first level) that a plain state dict was saved from, read from its
    convolution weights."""
    def weight(prefix: str) -> torch.Tensor:
        key = f"{prefix}.conv1.conv.weight"
        if key not in state:
            raise ValueError(f"not a state dict of the bundle's DynUNet: no {key!r}")
        return state[key]

    downs = sorted({int(k.split(".")[1]) for k in state if k.startswith("downsamples.")})
    blocks = [weight("input_block"), *(weight(f"downsamples.{i}") for i in downs), weight("bottleneck")]
    depth = len(blocks)
    spatial_dims = blocks[0].ndim - 2
    args = {
        "spatial_dims": spatial_dims,
        "in_channels": int(blocks[0].shape[1]),
        "out_channels": int(state["output_block.conv.conv.weight"].shape[0]),
        "kernel_size": [list(b.shape[2:]) for b in blocks],
        "strides": [[1] * spatial_dims] + [[2] * spatial_dims] * (depth - 1),
        "upsample_kernel_size": [[2] * spatial_dims] * (depth - 1),
        "filters": [int(b.shape[0]) for b in blocks],
        "norm_name": "instance",
        "deep_supervision": False,
        "res_block": False,
    }
    spec = {"name": "DynUNet", "args": json.loads(json.dumps(args))}
    build_network(spec).load_state_dict(state)  # the definition must fit the weights exactly
    return spec


def plan_from_fold_records(models_dir: str | os.PathLike, dataset: str,
                           sample_score_fraction: float = 0.01) -> dict:
    """A plan for ``models_dir/<dataset>`` made before plans existed, from what it holds: the network read from
    ``fold_0.pt``, the grid, normalisation and split from the ``fold_<k>.json`` records, the CT statistics from
    ``fingerprint.json``. Every fold must fit the same definition."""
    folder = Path(models_dir) / dataset
    weights = sorted(folder.glob("fold_*.pt"))
    if not weights:
        raise FileNotFoundError(f"no fold_<k>.pt models in {str(folder)!r}")
    spec = network_spec_from_state_dict(torch.load(weights[0], map_location="cpu", weights_only=True))
    for path in weights[1:]:
        build_network(spec).load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    records = [load_json(p) for p in sorted(folder.glob("fold_*.json"))]
    grids = {tuple(r["spatial_size"]) for r in records if "spatial_size" in r}
    modes = {r["normalisation"] for r in records if "normalisation" in r}
    if len(grids) != 1 or len(modes) != 1:
        raise ValueError(f"the fold records in {str(folder)!r} do not name one working grid and one normalisation "
                         f"(grids {sorted(grids)}, normalisations {sorted(modes)})")
    mode = modes.pop()
    fingerprint = load_json(folder / "fingerprint.json") if mode == "fingerprint" else None
    split = None
    splits = [r["split"] for r in records if "split" in r]
    if splits:
        scans = sorted({s for r in splits for s in (*r["train_scans"], *r["val_scans"])})
        first = splits[0]
        combos = model_folds(len(first["train_tasks"]), len(first["tasks"]))
        # explicit training tasks (e.g. the FPI-only baseline) rather than the fold's combination of the five
        standard = all(s["fold"] < len(combos) and list(s["train_tasks"]) == [s["tasks"][i] for i in combos[s["fold"]]]
                       for s in splits)
        split = split_record(scans, num_train_tasks=len(first["train_tasks"]), tasks=first["tasks"],
                             train_tasks=None if standard else first["train_tasks"])
    return make_plan(dataset, spec, grids.pop(), mode, fingerprint, split=split,
                     sample_score_fraction=sample_score_fraction)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Add plans.json to a models folder trained before plans existed.")
    parser.add_argument("--models_dir", required=True, help="folder of dataset subfolders (e.g. runs/models)")
    parser.add_argument("--dataset", required=True, help="the dataset subfolder (brain, abdom)")
    parser.add_argument("--sample_score_fraction", type=float, default=0.01,
                        help="the sample-score aggregation the models were validated with (default 0.01)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plan = plan_from_fold_records(args.models_dir, args.dataset, args.sample_score_fraction)
    path = ensure_plan(Path(args.models_dir) / args.dataset, plan)
    print(path)
    return path


if __name__ == "__main__":
    main()
