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

For a models folder of voxel classifiers (a plan with a ``classifier`` and no network, or with ``--classifier``),
each fold of ``--fold`` (several may be given; their validation samples are pooled) scores its own validation set
with its classifier alone, the trees on every voxel against coarse-to-fine scoring
(:func:`scripts.classifier.model.scoring_record`: stride ``--coarse_stride``, each share of ``--refine_top``), with
the seconds of the maps and the share of voxels the trees saw.
"""

from __future__ import annotations

import argparse
import sys
import time
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

from scripts.calibration import training_settings  # noqa: E402
from scripts.classifier.features import FeatureBank, NormativeStatistics  # noqa: E402
from scripts.classifier.model import VoxelClassifierEnsemble, classifier_files, load_booster, scoring_record  # noqa
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


def validation_set(args, plan: dict, fold: int):
    """Fold ``fold``'s fixed validation set (its held-out tasks and data fold), rebuilt from the training config
    with the run's plan."""
    parser = ConfigParser()
    parser.read_config(bundle_configs(REPO / "bundle", "train", args.dataset))
    overrides = {"bundle_root": str(REPO / "bundle"), "dataset_dir": args.dataset_dir, "fold": fold,
                 "plan": plan,  # the setup: the run's plan; its split and recipe make the validation samples
                 **training_settings(Path(args.run_dir) / "models" / args.dataset), "output_dir": args.run_dir,
                 "num_workers": 0}
    if args.num_train_tasks:
        overrides.update(num_train_tasks=args.num_train_tasks, train_tasks=None)
    if args.cache_dir:
        overrides["cache_dir"] = args.cache_dir
    if args.foreign_dir:
        overrides["foreign_dir"] = args.foreign_dir
    parser.update(overrides)
    if args.all_scans:
        parser["validate#dataset#scans"] = "@preprocessed_scans"
        parser["validate#dataset#max_samples"] = None
    return parser.get_parsed_content("validate#dataset")


def choose_classifier_scoring(args, plan: dict, models_dir: Path) -> dict:
    """Each fold's classifier on its own validation set: the trees on every voxel against coarse-to-fine scoring,
    the pooled pixel AP, the sample AP of each aggregation, the seconds per map and the share of voxels scored."""
    record = plan["classifier"]
    bank, recorded = FeatureBank(record["features"]), record.get("files") or {}
    variants = {"trees on every voxel": None}
    variants.update({f"stride {args.coarse_stride}, refine top {top:g}": scoring_record(args.coarse_stride, top)
                     for top in args.refine_top})
    pixel = {v: PixelAveragePrecision() for v in variants}
    scores = {v: {name: [] for name in AGGREGATIONS} for v in variants}
    seconds = {v: [] for v in variants}
    fraction = {v: [] for v in variants}
    labels, tasks = [], set()
    for fold in args.fold:
        model, normative = (models_dir / args.dataset / name for name in classifier_files(fold))
        member = (load_booster(model, recorded.get(model.name)), NormativeStatistics.load(normative,
                                                                                          recorded.get(normative.name)))
        dataset = validation_set(args, plan, fold)
        tasks.update(dataset.tasks)
        for i in range(len(dataset)):
            item = dataset[i]
            image = np.asarray(item["image"], np.float32)
            labels.append(float(item["label"].max() >= 0.5))
            for variant, scoring in variants.items():
                ensemble = VoxelClassifierEnsemble(bank, [member], scoring)
                start = time.perf_counter()
                prediction = torch.from_numpy(ensemble.scan_map(image))
                seconds[variant].append(time.perf_counter() - start)
                fraction[variant].append(ensemble.last_fraction_scored)
                pixel[variant].update(([prediction], [torch.as_tensor(np.asarray(item["label"]))]))
                for name, aggregate in AGGREGATIONS.items():
                    scores[variant][name].append(aggregate(prediction))
    result = {"models": str(models_dir / args.dataset), "folds": args.fold, "val_tasks": sorted(tasks),
              "all_scans": args.all_scans, "samples": len(labels), "anomalous": int(sum(labels)),
              "scoring": {v: s for v, s in variants.items()},
              "pixel_ap": {v: pixel[v].compute() for v in variants},
              "sample_ap": {v: {name: float(average_precision_score(labels, s)) for name, s in scores[v].items()}
                            for v in variants},
              "seconds_per_map": {v: float(np.median(t)) for v, t in seconds.items()},
              "fraction_scored": {v: float(np.mean(f)) for v, f in fraction.items()}}
    print(table(result))
    print("\n| scoring | s per map (median) | voxels the trees saw |\n| --- | ---: | ---: |")
    for v in variants:
        print(f"| {v} | {result['seconds_per_map'][v]:.2f} | {result['fraction_scored'][v]:.2f} |")
    return result


def main(argv=None) -> dict:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--run_dir", required=True)
    cli.add_argument("--dataset_dir", required=True)
    cli.add_argument("--dataset", default="brain")
    cli.add_argument("--foreign_dir", default=None, help="the run's foreign_dir (poisson_inter), if it had one")
    cli.add_argument("--fold", type=int, nargs="+", default=[0],
                     help="the fold (classifiers: the folds, their validation samples pooled)")
    cli.add_argument("--num_train_tasks", type=int, default=None, help="default: the plan's split's")
    cli.add_argument("--cache_dir", default=None)
    cli.add_argument("--all_scans", action="store_true",
                     help="held-out tasks on every scan (more samples; the training scans' anatomy was seen)")
    cli.add_argument("--normalisation", choices=("zscore", "robust"), default=None,
                     help="score with this normalisation instead of the plan's (the same weights)")
    cli.add_argument("--classifier", action="store_true",
                     help="a folder of classifiers and networks: its classifiers (a folder without networks: always)")
    cli.add_argument("--coarse_stride", type=int, default=2, help="classifiers: the coarse lattice's stride")
    cli.add_argument("--refine_top", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3],
                     help="classifiers: shares of the coarse probabilities refined")
    cli.add_argument("--json", default=str(REPO / "bench/results/inference_choices.json"))
    args = cli.parse_args(argv)

    models_dir = Path(args.run_dir) / "models"
    plan = load_plan(models_dir, args.dataset)
    if args.normalisation is not None:
        plan["normalisation"] = {"mode": args.normalisation, "fingerprint": None}
    if plan.get("network") is None or args.classifier:
        result = choose_classifier_scoring(args, plan, models_dir)
        save_json(result, args.json)
        return result
    if len(args.fold) != 1:
        cli.error("networks: one --fold at a time")
    dataset = validation_set(args, plan, args.fold[0])
    network = build_network(plan)
    checkpoint = models_dir / args.dataset / f"fold_{args.fold[0]}.pt"
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
