"""Choose the inference-time choices on synthetic validation data (never on toy test cases).

Run from the repository root after a training run::

    PYTHONPATH=bundle .venv/bin/python bench/choose_inference.py --run_dir RUN --dataset_dir DIR \
        [--dataset brain] [--foreign_dir DIR] [--fold 0] [--all_scans] [--normalisation robust] [--json PATH]

Rebuilds the run's fixed validation set (held-out tasks, about half the samples normal) from the training
config and the run's own plan (its grid, normalisation and network), predicts each sample with the fold's best
checkpoint, and reports for each way to make the map (the plain sigmoid; the mean over the image and its
left-right flip, or its flips along each axis; Gaussian smoothing of the map, sigma in working-grid voxels; for
models trained on patches, whole scans in one pass and in sliding windows) the
pooled pixel AP and the sample AP of several ways to turn a map into one score: the mean of the top fraction of
voxels (1 voxel, 1e-4, 1e-3, 1e-2), the mean of the whole map, and FPI's slice score (per-slice mean, smoothed
along the slices, mean of the top 25 %). ``--normalisation`` scores the same weights with another intensity
normalisation than their plan's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.signal import savgol_filter
from sklearn.metrics import average_precision_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))
sys.path.insert(1, str(REPO))  # the tools

from monai.bundle import ConfigParser  # noqa: E402
from monai.transforms import GaussianSmooth  # noqa: E402

from scripts.inference.ensemble import Ensemble  # noqa: E402
from scripts.inference.predictor import Predictor  # noqa: E402
from scripts.io.files import bundle_configs, save_json  # noqa: E402
from scripts.networks import build_network, inferer_for  # noqa: E402
from scripts.plans import load_plan  # noqa: E402
from scripts.scores import sample_score  # noqa: E402
from scripts.training.metrics import PixelAveragePrecision  # noqa: E402


def fpi_slice_score(prediction: torch.Tensor, axis: int = 2) -> float:
    """FPI's slice score (its readme; Tan et al. 2020, "Detecting outliers with foreign patch interpolation",
    arXiv:2011.04197): per-slice mean, Savitzky-Golay smoothing over ~10 % of the slices, then the mean of the
    top 25 % of slices."""
    values = prediction.reshape(prediction.shape[-3:]).float().numpy()
    per_slice = values.mean(axis=tuple(i for i in range(3) if i != axis))
    window = max(3, int(round(0.1 * per_slice.size)) // 2 * 2 + 1)
    smoothed = savgol_filter(per_slice, window, polyorder=2) if per_slice.size > window else per_slice
    top = np.sort(smoothed)[::-1][: max(1, per_slice.size // 4)]
    return float(top.mean())


AGGREGATIONS = {
    "max (1 voxel)": lambda p: float(p.max()),
    "top 1e-4": lambda p: float(sample_score(p, 1e-4)),
    "top 1e-3": lambda p: float(sample_score(p, 1e-3)),
    "top 1e-2": lambda p: float(sample_score(p, 1e-2)),
    "mean": lambda p: float(p.mean()),
    "FPI slices": fpi_slice_score,
}


# how the map is made from the network: the plain sigmoid, or the inference ensemble's test-time flips (the
# input is a batch of one on the RAS working grid; spatial axis 0 is left-right); each through the plan's inferer
# (one pass, or sliding windows for patch models whose plan says so), as inference runs it
def predicted(network, image, inferer, flip_axes=()):
    """The map of the inference's Predictor for this one fold (with ``flip_axes``: test-time flips)."""
    return Predictor(Ensemble([network], flip_axes=flip_axes), inferer).predict_map(image)


MAPS = {
    "plain": predicted,
    "left-right flip": lambda network, image, inferer: predicted(network, image, inferer, (0,)),
    "flips of all axes": lambda network, image, inferer: predicted(network, image, inferer, (0, 1, 2)),
}
SMOOTHING = (1.0, 2.0)


def table(result: dict) -> str:
    """Markdown: per way of making the map, its pixel AP and the sample AP of each aggregation."""
    lines = ["| map | pixel AP | " + " | ".join(AGGREGATIONS) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in AGGREGATIONS) + " |"]
    for variant, pixel_ap in result["pixel_ap"].items():
        lines.append(f"| {variant} | {pixel_ap:.3f} | "
                     + " | ".join(f"{result['sample_ap'][variant][name]:.3f}" for name in AGGREGATIONS) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--run_dir", required=True)
    cli.add_argument("--dataset_dir", required=True)
    cli.add_argument("--dataset", default="brain")
    cli.add_argument("--foreign_dir", default=None, help="the run's foreign_dir (poisson_inter), if it had one")
    cli.add_argument("--fold", type=int, default=0)
    cli.add_argument("--num_train_tasks", type=int, default=1)
    cli.add_argument("--cache_dir", default=None)
    cli.add_argument("--all_scans", action="store_true",
                     help="held-out tasks on every scan (more samples; the training scans' anatomy was seen)")
    cli.add_argument("--normalisation", choices=("zscore", "robust"), default=None,
                     help="score with this normalisation instead of the plan's (the same weights)")
    cli.add_argument("--json", default=str(REPO / "bench/results/inference_choices.json"))
    args = cli.parse_args(argv)

    models_dir = Path(args.run_dir) / "models"
    plan = load_plan(models_dir, args.dataset)
    if args.normalisation is not None:
        plan["normalisation"] = {"mode": args.normalisation, "fingerprint": None}
    parser = ConfigParser()
    parser.read_config(bundle_configs(REPO / "bundle", "train", args.dataset))
    overrides = {"bundle_root": str(REPO / "bundle"), "dataset_dir": args.dataset_dir, "fold": args.fold,
                 "num_train_tasks": args.num_train_tasks, "plan": plan,  # the setup: the run's plan
                 "output_dir": args.run_dir, "num_workers": 0}
    if args.cache_dir:
        overrides["cache_dir"] = args.cache_dir
    if args.foreign_dir:
        overrides["foreign_dir"] = args.foreign_dir
    parser.update(overrides)
    if args.all_scans:
        parser["validate#dataset#scans"] = "@preprocessed_scans"
        parser["validate#dataset#max_samples"] = None
    dataset = parser.get_parsed_content("validate#dataset")
    network = build_network(plan)
    checkpoint = models_dir / args.dataset / f"fold_{args.fold}.pt"
    network.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    network.eval()
    inferer = inferer_for(plan)

    maps_of = dict(MAPS)
    if plan["patch_size"]:  # models trained on patches: also the other way to see a whole scan than their plan's
        other = not plan["sliding_window"]
        other_inferer = inferer_for(plan, other)
        maps_of["plain, in sliding windows" if other else "plain, in one pass"] = (
            lambda network, image, _: predicted(network, image, other_inferer))
    variants = list(maps_of) + [f"plain, smoothed sigma {sigma:g}" for sigma in SMOOTHING]
    smoothers = {f"plain, smoothed sigma {sigma:g}": GaussianSmooth(sigma) for sigma in SMOOTHING}
    scores = {v: {name: [] for name in AGGREGATIONS} for v in variants}
    pixel = {v: PixelAveragePrecision() for v in variants}
    labels = []
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            image = item["image"][None].float()
            maps = {name: make(network, image, inferer)[0] for name, make in maps_of.items()}
            maps.update({name: smooth(maps["plain"]) for name, smooth in smoothers.items()})
            labels.append(float(item["label"].max() >= 0.5))
            for variant, prediction in maps.items():
                pixel[variant].update(([prediction], [item["label"]]))
                for name, aggregate in AGGREGATIONS.items():
                    scores[variant][name].append(aggregate(prediction))
    result = {"checkpoint": str(checkpoint), "normalisation": plan["normalisation"]["mode"],
              "val_tasks": list(dataset.tasks), "all_scans": args.all_scans, "samples": len(labels),
              "anomalous": int(sum(labels)),
              "pixel_ap": {v: pixel[v].compute() for v in variants},
              "sample_ap": {v: {name: float(average_precision_score(labels, s)) for name, s in scores[v].items()}
                            for v in variants}}
    print(table(result))
    save_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
