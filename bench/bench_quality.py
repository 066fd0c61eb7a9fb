"""Detection quality on held-out MOOD-sized sets, through the MOOD run scripts' shared body, next to two baselines.

Run from the repository root (``make bench-quality [MODELS=runs/models]``)::

    PYTHONPATH=bundle:. .venv/bin/python bench/bench_quality.py [--models_dir bundle/models | --models NAME=DIR ...]
        [--datasets brain abdom] [--size 256] [--cases 20] [--gorilla 6] [--train 10]
        [--conventions mood raw] [--seed 2026] [--variability cohort|phantom] [--work_dir outputs/bench-quality]
        [--json PATH] [--reuse_data]

For each dataset it generates, with the toy generator (``tools.toy_data``) and a seed no training run uses:

- ``--cases`` held-out toy cases at ``--size``^3, half of them normal, the anomalous ones of the toy kinds
  (tumour, infarct, spots, foreign object, noise patch, missing slab), which no training task makes;
- ``--gorilla`` plainly abnormal cases (a cube of uniform noise, a constant bright cube, an upside-down block:
  :data:`tools.toy_data.GORILLA_KINDS`), each on a subject of its own;
- ``--train`` normal scans for the z-score baseline (never scored).

Every subject, normal or not, varies as in a real cohort by default (``--variability cohort``,
:func:`tools.toy_data.cohort_variation`: rotated, scaled, shifted and warped by a few millimetres, with its own bias
field or tissue contrasts), so that features that compare a scan voxel by voxel with the normals are not flattered;
``phantom`` scores the phantoms as they are (the sets of the studies before 0.12.0).

Every case is written in each intensity convention of ``--conventions``: ``mood`` is what the challenge ships,
[0, 1] (the brain phantom is in [0, 1]; the CT phantom's Hounsfield units are mapped linearly, (HU + 1024) / 4095);
``raw`` is the scanner's unit (CT in HU; MR as [0, 1] x 1000 + 100). The body of the four MOOD scripts,
``docker/run_mood.sh both <dataset>`` (with ``MOOD_MODELS_DIR``: the pixel maps and the sample scores from one pass
of the ensemble, the same outputs as the pixel and sample scripts), scores each convention's folder, and the outputs
are scored with MOOD's semantics (``scripts.evaluate``: maps read as float16 and clipped, all voxels of a group
pooled into one AP, sample AP over the case scores). Groups: ``all``, ``toy`` (all toy cases), each toy kind (its
single-kind cases and all normal cases), ``gorilla`` (the gorilla cases and all normal cases) and each gorilla kind.
``--rescore`` scores the data and predictions an earlier run left in ``--work_dir`` again. ``--models NAME=DIR ...``
scores several models folders on the same cases (methods ``bundle_<NAME>_<convention>``; e.g. the slice-wise and 3D
models of ``bench/bench_slicewise.py``) instead of the one of ``--models_dir`` (methods ``bundle_<convention>``).

Baselines on the same cases (computed on the ``mood`` convention, as MOOD ships the data):
- ``mood_example``: the MOOD example's pixel score ``|x - 0.5|``;
- ``zscore``: ``|x - mean| / (std + 0.01)`` voxel by voxel against the training normals on the common grid (no
  registration), mapped to [0, 1] by ``z / (1 + z)``.
Their sample score is the mean of the top 1 % of their map, as the bundle's default.

The JSON (default ``bench/results/quality.json``) holds every number and the settings; two Markdown tables are
printed last (toy and gorilla sets; every group as pixel AP / sample AP), also from an earlier JSON with
``--from_json PATH``. Generated data stays in ``--work_dir`` (never committed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from sklearn.metrics import average_precision_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))
sys.path.insert(1, str(REPO))

from scripts.evaluate import count_metrics, float16_bin_counts  # noqa: E402
from scripts.io.files import MOOD_DATASETS, save_json  # noqa: E402
from scripts.scores import sample_score  # noqa: E402
from tools.demo import run_script  # noqa: E402
from tools.toy_data import ANOMALY_KINDS, GORILLA_KINDS, VARIABILITIES, write_toy_dataset  # noqa: E402

DATASETS = MOOD_DATASETS
CONVENTIONS = ("mood", "raw")
HU_LOW, HU_SPAN = -1024.0, 4095.0  # the CT phantom's HU range onto [0, 1] (12-bit CT)
MR_SCALE, MR_OFFSET = 1000.0, 100.0  # "scanner units" of the [0, 1] brain phantom
TOP_FRACTION = 0.01  # the bundle's default sample score: the mean of the top 1 % of the map


def to_convention(volume: np.ndarray, dataset: str, convention: str) -> np.ndarray:
    """A toy scan (brain in [0, 1], abdomen in HU) in ``convention``, float32."""
    volume = np.asarray(volume, np.float32)
    if dataset == "abdom":
        return (volume - HU_LOW) / HU_SPAN if convention == "mood" else volume
    return volume if convention == "mood" else volume * MR_SCALE + MR_OFFSET


def write_conventions(data_dir: Path, dataset: str, conventions) -> dict[str, Path]:
    """``data_dir/toy`` rewritten in each convention: ``{convention: folder}``."""
    folders = {}
    for convention in conventions:
        folder = data_dir / f"cases_{convention}"
        folder.mkdir(exist_ok=True)
        for path in sorted((data_dir / "toy").glob("*.nii.gz")):
            image = nib.load(path)
            volume = to_convention(np.asanyarray(image.dataobj), dataset, convention)
            nib.save(nib.Nifti1Image(volume, image.affine), folder / path.name)
        folders[convention] = folder
    return folders


def normal_statistics(train_dir: Path, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """Voxel-wise mean and std of the training normals (``mood`` convention), streamed one scan at a time."""
    total = squares = None
    paths = sorted(train_dir.glob("*.nii.gz"))
    for path in paths:
        volume = to_convention(np.asanyarray(nib.load(path).dataobj), dataset, "mood").astype(np.float64)
        total = volume if total is None else total + volume
        squares = volume**2 if squares is None else squares + volume**2
    mean = total / len(paths)
    return mean.astype(np.float32), np.sqrt(np.maximum(squares / len(paths) - mean**2, 0)).astype(np.float32)


def groups(cases: dict[str, dict]) -> dict[str, list[str]]:
    """Group name -> case names: ``all``, ``toy``, each kind with every normal case, ``gorilla`` likewise."""
    normal = [n for n, c in cases.items() if c["label"] == 0]
    toy = [n for n in cases if n.startswith("toy_")]
    gorilla = [n for n in cases if n.startswith("gorilla_")]
    out = {"all": list(cases), "toy": toy}
    for kind in ANOMALY_KINDS:  # cases of that kind alone: a case's mask does not say which kind made a voxel
        out[kind] = normal + [n for n in toy if cases[n]["kinds"] == [kind]]
    if gorilla:
        out["gorilla"] = normal + gorilla
        for kind in GORILLA_KINDS:
            out[kind] = normal + [n for n in gorilla if kind in cases[n]["kinds"]]
    return out


def score_groups(per_case: dict[str, dict], cases: dict[str, dict], group_cases: dict[str, list[str]]) -> dict:
    """Pixel AP (voxels pooled over the group's cases) and sample AP of each group."""
    out = {}
    for group, names in group_cases.items():
        positives = sum(per_case[n]["positives"] for n in names)
        negatives = sum(per_case[n]["negatives"] for n in names)
        labels = [cases[n]["label"] for n in names]
        pixel = count_metrics(positives, negatives)
        out[group] = {
            "n_cases": len(names), "n_anomalous": int(sum(labels)),
            "pixel_ap": pixel["average_precision"],
            "sample_ap": float(average_precision_score(labels, [per_case[n]["score"] for n in names]))
            if 0 < sum(labels) < len(labels) else None,
        }
    return out


def baseline_score(score_map: np.ndarray) -> float:
    return float(sample_score(torch.from_numpy(score_map), TOP_FRACTION))


def case_counts(score_map: np.ndarray, label: np.ndarray, score: float) -> dict:
    positives, negatives, _ = float16_bin_counts(score_map, label)
    return {"positives": positives, "negatives": negatives, "score": score}


def bundle_runs(models: dict[str, Path], conventions, predictions: Path) -> dict[str, tuple[Path, Path]]:
    """Method name -> (models folder, predictions folder) of every models set and convention: ``bundle_<convention>``
    for the one unnamed set, ``bundle_<name>_<convention>`` for named ones."""
    return {(f"bundle_{name}_{c}" if name else f"bundle_{c}"): (folder, predictions / name / c if name else
                                                                  predictions / c)
            for name, folder in models.items() for c in conventions}


def evaluate_dataset(data_dir: Path, dataset: str, cases: dict, folders: dict[str, Path], predictions: Path,
                     models: dict[str, Path] | None = None) -> dict:
    """Every method's per-case counts and scores, then its groups."""
    mean, std = normal_statistics(data_dir / f"{dataset}_train", dataset)
    runs = bundle_runs(models or {"": None}, folders, predictions)
    per_method: dict[str, dict[str, dict]] = {method: {} for method in runs}
    per_method.update(mood_example={}, zscore={})
    for name in cases:
        label = np.asanyarray(nib.load(data_dir / "toy_label" / "pixel" / name).dataobj)
        for method, (_, out) in runs.items():
            score_map = np.asanyarray(nib.load(out / name).dataobj)
            score = float((out / f"{name}.txt").read_text().split()[0])
            per_method[method][name] = case_counts(score_map, label, score)
        scan = to_convention(np.asanyarray(nib.load(data_dir / "toy" / name).dataobj), dataset, "mood")
        example = np.clip(np.abs(scan - 0.5), 0, 1)
        per_method["mood_example"][name] = case_counts(example, label, baseline_score(example))
        z = np.abs(scan - mean) / (std + 0.01)
        z = z / (1 + z)
        per_method["zscore"][name] = case_counts(z, label, baseline_score(z))
    group_cases = groups(cases)
    return {method: score_groups(counts, cases, group_cases) for method, counts in per_method.items()}


def run(models: dict[str, Path] | Path, work_dir: Path, datasets, size: int, n_cases: int, n_gorilla: int, n_train: int,
        conventions, seed: int, rescore: bool = False, variability: str = "cohort", reuse_data: bool = False) -> dict:
    """``models``: name -> models folder (one unnamed ``{"": folder}``, or several named sets), or one folder."""
    if isinstance(models, (str, Path)):
        models = {"": Path(models)}
    result = {"settings": {"models_dir": {name: str(folder) for name, folder in models.items()} if any(models)
                           else str(models[""]), "size": size, "cases": n_cases, "gorilla": n_gorilla,
                           "train": n_train, "conventions": list(conventions), "seed": seed,
                           "variability": variability,
                           "date": datetime.date.today().isoformat()}, "datasets": {}}
    for dataset in datasets:
        data_dir = work_dir / "data" / dataset
        if rescore:  # the data and predictions of an earlier run
            cases = json.loads((data_dir / "toy_label" / "anomalies.json").read_text())["cases"]
            folders = {c: data_dir / f"cases_{c}" for c in conventions}
            methods = evaluate_dataset(data_dir, dataset, cases, folders, work_dir / "predictions" / dataset, models)
            result["datasets"][dataset] = {"methods": methods}
            continue
        started = time.perf_counter()
        settings_file = data_dir / "settings.json"
        wanted = {"size": size, "cases": n_cases, "gorilla": n_gorilla, "train": n_train, "seed": seed,
                  "variability": variability, "conventions": sorted(conventions)}
        earlier = json.loads(settings_file.read_text()) if reuse_data and settings_file.is_file() else None
        same_cases = earlier is not None and {**earlier, "conventions": None} == {**wanted, "conventions": None}
        if same_cases:  # the same cases; a convention the earlier run did not write is written from them
            written = {"cases": json.loads((data_dir / "toy_label" / "anomalies.json").read_text())["cases"]}
            missing = [c for c in conventions if c not in earlier["conventions"]]
            write_conventions(data_dir, dataset, missing)
            settings_file.write_text(json.dumps({**wanted, "conventions": sorted({*earlier["conventions"], *missing})}))
            folders = {c: data_dir / f"cases_{c}" for c in conventions}
        else:
            if data_dir.exists():
                shutil.rmtree(data_dir)
            written = write_toy_dataset(work_dir / "data", dataset, n_train=n_train, n_toy=n_cases, size=size,
                                        seed=seed, n_gorilla=n_gorilla, variability=variability)
            folders = write_conventions(data_dir, dataset, conventions)
            settings_file.write_text(json.dumps(wanted))
        generated = time.perf_counter() - started
        predictions = work_dir / "predictions" / dataset
        seconds = {}
        for method, (models_dir, out) in bundle_runs(models, conventions, predictions).items():
            if out.exists():  # both outputs from one pass (run_mood.sh both)
                shutil.rmtree(out)
            seconds[method.removeprefix("bundle_")] = run_script("both", dataset, folders[out.name], out, models_dir,
                                                                 quiet=True) / len(written["cases"])
        result["datasets"][dataset] = {
            "methods": evaluate_dataset(data_dir, dataset, written["cases"], folders, predictions, models),
            "seconds_per_case": seconds, "seconds_generating": generated,
        }
        print(f"{dataset}: done in {time.perf_counter() - started:.0f} s", flush=True)
    return result


def table(result: dict) -> str:
    """Markdown: per dataset and method, pixel / sample AP of the toy set and the gorilla set."""
    lines = ["| dataset | method | toy pixel AP | toy sample AP | gorilla pixel AP | gorilla sample AP |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]

    def fmt(value):
        return "-" if value is None else f"{value:.3f}"

    for dataset, entry in result["datasets"].items():
        for method, scored in entry["methods"].items():
            toy, gorilla = scored["toy"], scored.get("gorilla", {})
            lines.append(f"| {dataset} | {method} | {fmt(toy['pixel_ap'])} | {fmt(toy['sample_ap'])} | "
                         f"{fmt(gorilla.get('pixel_ap'))} | {fmt(gorilla.get('sample_ap'))} |")
    return "\n".join(lines)


def group_table(result: dict) -> str:
    """Markdown: per dataset and group (each kind), every method's pixel AP / sample AP."""
    first = next(iter(result["datasets"].values()))["methods"]
    methods = list(first)
    lines = ["| dataset | group | cases (anomalous) | " + " | ".join(methods) + " |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in methods) + " |"]

    def fmt(value):
        return "-" if value is None else f"{value:.3f}"

    for dataset, entry in result["datasets"].items():
        for group, scored in entry["methods"][methods[0]].items():
            cells = [f"{fmt(entry['methods'][m][group]['pixel_ap'])} / {fmt(entry['methods'][m][group]['sample_ap'])}"
                     for m in methods]
            lines.append(f"| {dataset} | {group} | {scored['n_cases']} ({scored['n_anomalous']}) | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models_dir", type=Path, default=REPO / "bundle" / "models")
    parser.add_argument("--models", nargs="+", default=None, metavar="NAME=DIR",
                        help="several models folders, scored on the same cases (instead of --models_dir)")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--size", type=int, default=256, help="cube side of every case (MOOD brain: 256)")
    parser.add_argument("--cases", type=int, default=20, help="held-out toy cases per dataset, half normal")
    parser.add_argument("--gorilla", type=int, default=6, help="plainly abnormal cases per dataset")
    parser.add_argument("--train", type=int, default=10, help="normal scans for the z-score baseline")
    parser.add_argument("--conventions", nargs="+", choices=CONVENTIONS, default=list(CONVENTIONS))
    parser.add_argument("--seed", type=int, default=2026, help="toy seed; the shipped weights were trained on 0")
    parser.add_argument("--variability", choices=VARIABILITIES, default="cohort",
                        help="how the subjects differ (tools.toy_data): cohort (real-cohort spread) or phantom")
    parser.add_argument("--work_dir", type=Path, default=REPO / "outputs" / "bench-quality")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "quality.json")
    parser.add_argument("--from_json", type=Path, default=None, help="print the tables of an earlier run, run nothing")
    parser.add_argument("--rescore", action="store_true", help="score an earlier run's data and predictions again")
    parser.add_argument("--reuse_data", action="store_true",
                        help="score the models on the cases an earlier run generated with the same settings")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        print(table(result) + "\n\n" + group_table(result))
        return result
    models = {"": args.models_dir.resolve()}
    if args.models:
        pairs = [entry.partition("=") for entry in args.models]
        if any(not name or not sep or not folder for name, sep, folder in pairs):
            parser.error("--models takes NAME=DIR entries, e.g. 3d=runs/models")
        models = {name: Path(folder).resolve() for name, _, folder in pairs}
    result = run(models, args.work_dir.resolve(), args.datasets, args.size, args.cases,
                 args.gorilla, args.train, args.conventions, args.seed, args.rescore, args.variability,
                 args.reuse_data)
    if args.rescore and args.json.is_file():  # the timings of the run that made the predictions
        earlier = json.loads(args.json.read_text()).get("datasets", {})
        for dataset, entry in result["datasets"].items():
            entry.update({k: v for k, v in earlier.get(dataset, {}).items() if k != "methods"})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    save_json(result, args.json)
    print(json.dumps({d: {m: s["toy"] for m, s in e["methods"].items()} for d, e in result["datasets"].items()}))
    print(table(result) + "\n\n" + group_table(result))
    print(f"json: {args.json}")
    return result


if __name__ == "__main__":
    main()
