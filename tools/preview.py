"""Preview the synthetic-anomaly tasks on offline volumes: one PNG per dataset and task.

Run::

    PYTHONPATH=bundle:. python -m tools.preview --output_dir DIR [--size 128] [--seed 0]

Datasets:

- ``brain``: the MNI152 T1 template (z-scored over the brain); its partner scan (``fpi``,
  ``poisson_intra``) is a deformed, re-contrasted copy (:func:`tools.phantoms.brain_partner`) and its
  foreign scan (``poisson_inter``) the CT phantom, z-scored over the body.
- ``abdom``: the abdominal CT phantom in Hounsfield units; partner = the phantom with another seed,
  foreign = the brain.

Each figure is a 3x3 grid: rows before / after / label, columns three orthogonal slices (sagittal, coronal,
axial, in the volumes' left-right, posterior-anterior, inferior-superior voxel order) through a point deep in
the most labelled anomaly (see :func:`focus_point`).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from scripts.anomalies import TASK_NEEDS, TASKS, synthesize
from scripts.io.files import MOOD_DATASETS
from tools.phantoms import brain_partner, ct_phantom, mni152_brain, zscore

__all__ = [
    "CT_WINDOW",
    "DATASETS",
    "focus_point",
    "load_dataset",
    "main",
    "render_preview",
    "run_task",
    "write_previews",
]

DATASETS = MOOD_DATASETS
# Fixed grey window for CT: soft tissue, W400 / L40.
CT_WINDOW = (40.0 - 200.0, 40.0 + 200.0)
# A preview shows the first draw whose label exceeds 0.5 on this fraction of the volume, inside the
# foreground (~13^3 voxels at 128^3).
MIN_LABELLED_FRACTION = 1e-3
MAX_DRAWS = 8
AXIS_NAMES = ("sagittal", "coronal", "axial")
AXIS_LETTERS = ("x", "y", "z")


def load_dataset(name: str, size: int = 128, seed: int = 0,
                 need: Iterable[str] = ("partner", "foreign")) -> dict:
    """The image, foreground, grey window and (when asked for in ``need``) partner and foreign scans of a
    preview dataset, as numpy arrays."""
    need = set(need)
    out: dict = {"name": name}
    if name == "brain":
        image, fg = mni152_brain(size)
        out.update(image=image, foreground=fg)
        low, high = np.percentile(image[fg], [0.5, 99.5])
        out["window"] = (float(low), float(high))
        if "partner" in need:
            out["partner"], out["partner_foreground"] = brain_partner(image, fg, seed + 1)
        if "foreign" in need:
            ct, ct_fg = ct_phantom(size, seed)
            out["foreign"], out["foreign_foreground"] = zscore(ct, ct_fg), ct_fg
    elif name == "abdom":
        image, fg = ct_phantom(size, seed)
        out.update(image=image, foreground=fg, window=CT_WINDOW)
        if "partner" in need:
            out["partner"], out["partner_foreground"] = ct_phantom(size, seed + 1)
        if "foreign" in need:
            out["foreign"], out["foreign_foreground"] = mni152_brain(size)
    else:
        raise ValueError(f"unknown dataset {name!r}; available: {DATASETS}")
    return out


def _tensor(x: np.ndarray | None, channel: bool = True) -> torch.Tensor | None:
    if x is None:
        return None
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t[None] if channel else t


def run_task(data: dict, task: str, gen: torch.Generator | int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Apply ``task`` to the dataset's image with ``gen`` (an int: ``torch.Generator().manual_seed(gen)``).

    Returns (anomalous image, label, info) with image and label as spatial numpy arrays."""
    if not isinstance(gen, torch.Generator):
        gen = torch.Generator().manual_seed(int(gen))
    after, label, info = synthesize(
        _tensor(data["image"]),
        gen,
        task,
        foreground=_tensor(data["foreground"], channel=False),
        partner=_tensor(data.get("partner")),
        foreign=_tensor(data.get("foreign")),
        partner_foreground=_tensor(data.get("partner_foreground"), channel=False),
        foreign_foreground=_tensor(data.get("foreign_foreground"), channel=False),
    )
    return after[0].numpy(), label[0].numpy(), info


def _slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    # transpose so that the later axis runs upwards (origin="lower"): superior up, anterior up in axial
    return np.take(volume, index, axis=axis).T


def focus_point(label: np.ndarray, info: dict, foreground: np.ndarray | None = None,
                window: int = 7) -> tuple[int, ...]:
    """The voxel the preview's slices go through: deep inside the labelled, in-foreground part of the most
    labelled anomaly.

    An anomaly's centre need not be labelled (the labeller marks only voxels that changed: a sink in a
    homogeneous region barely changes its centre), the first anomaly may be a tiny one, and an anomaly may
    reach out of the foreground (into the air around a CT body, where the soft-tissue window hides any
    change). So this weighs the label by ``foreground``, takes the anomaly whose box holds the most of it,
    and in that box the maximum of the weighted label averaged over ``window``^3 voxels; the first
    anomaly's centre if no box holds any label."""
    from scipy import ndimage as ndi

    weight = label if foreground is None else np.where(foreground, label, 0.1 * label)
    anomalies = info["anomalies"]
    boxes = [tuple(slice(int(a), int(b)) for a, b in anomaly["box"]) for anomaly in anomalies]
    mass = [float(weight[box].sum()) for box in boxes]
    best = int(np.argmax(mass))
    if mass[best] <= 0.0:
        return tuple(int(c) for c in anomalies[0]["centre"])
    box = boxes[best]
    smooth = ndi.uniform_filter(weight[box].astype(np.float32), size=window, mode="constant")
    index = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
    return tuple(int(i) + sl.start for i, sl in zip(index, box, strict=True))


def render_preview(before: np.ndarray, after: np.ndarray, label: np.ndarray, info: dict,
                   window: Sequence[float], title: str, path: Path, foreground: np.ndarray | None = None,
                   dpi: int = 90) -> Path:
    """Write the 3x3 before / after / label figure through :func:`focus_point` to ``path``; small cyan
    ticks on the image borders mark the other two slices."""
    from matplotlib.figure import Figure  # no pyplot: no backend state, nothing to close

    centre = focus_point(label, info, foreground)
    fig = Figure(figsize=(7.2, 7.4), layout="constrained")
    axes = fig.subplots(3, 3)
    grey = dict(cmap="gray", vmin=window[0], vmax=window[1], origin="lower", interpolation="nearest")
    hot = dict(cmap="hot", vmin=0.0, vmax=1.0, origin="lower", interpolation="nearest")
    rows = (("before", before, grey), ("after", after, grey), ("label", label, hot))
    for r, (row_name, volume, style) in enumerate(rows):
        for axis in range(3):
            ax = axes[r, axis]
            shown = ax.imshow(_slice(volume, axis, centre[axis]), **style)
            if r < 2:  # ticks at the borders: where the other two slices cut this one
                h, v = [centre[a] for a in range(3) if a != axis]
                ax.plot([h], [-0.5], marker="^", color="cyan", markersize=6, clip_on=False)
                ax.plot([-0.5], [v], marker=">", color="cyan", markersize=6, clip_on=False)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{AXIS_NAMES[axis]} ({AXIS_LETTERS[axis]}={centre[axis]})", fontsize=9)
            if axis == 0:
                ax.set_ylabel(row_name, fontsize=10)
        if r == 1:
            fig.colorbar(shown, ax=axes[:2, :].ravel().tolist(), shrink=0.6, label="intensity (window)")
        if r == 2:
            fig.colorbar(shown, ax=axes[2, :].ravel().tolist(), shrink=0.9, label="label")
    fig.suptitle(title, fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def write_previews(output_dir: str | Path, size: int = 128, seed: int = 0, datasets: Sequence[str] = DATASETS,
                   tasks: Sequence[str] | None = None) -> list[Path]:
    """Write ``output_dir/preview_<dataset>_<task>.png`` for every dataset and task (default: all of
    ``TASKS``); print and return the paths.

    Each task gets ``torch.Generator().manual_seed(seed)``. A draw may consist of a single anomaly too small
    to see (the engine's smallest shapes are 6 % of the side), so the preview keeps drawing from the same
    generator, up to ``MAX_DRAWS`` times, until the label exceeds 0.5 on at least ``MIN_LABELLED_FRACTION``
    of the volume inside the foreground; the title says which draw is shown when it is not the first."""
    output_dir = Path(output_dir)
    tasks = list(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; available: {sorted(TASKS)}")
    written = []
    for name in datasets:
        data = load_dataset(name, size, seed, need={TASK_NEEDS[t] for t in tasks} - {None})
        min_labelled = MIN_LABELLED_FRACTION * data["image"].size
        for task in tasks:
            gen = torch.Generator().manual_seed(int(seed))
            draw = 0
            while True:
                draw += 1
                after, label, info = run_task(data, task, gen)
                if draw >= MAX_DRAWS or int(((label > 0.5) & data["foreground"]).sum()) >= min_labelled:
                    break
            count = len(info["anomalies"])
            kinds = ", ".join(a["kind"] for a in info["anomalies"])
            title = f"{name}: {task}, {count} anomal{'y' if count == 1 else 'ies'} ({kinds})"
            if draw > 1:
                title += f", draw {draw}"
            path = render_preview(data["image"], after, label, info, data["window"], title,
                                  output_dir / f"preview_{name}_{task}.png", foreground=data["foreground"])
            print(path)
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, type=Path, help="where the PNGs go")
    parser.add_argument("--size", type=int, default=128, help="side of the cubic volumes (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the volumes and the anomalies")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--tasks", nargs="+", default=None, choices=sorted(TASKS), help="default: all")
    args = parser.parse_args(argv)
    return write_previews(args.output_dir, size=args.size, seed=args.seed, datasets=args.datasets,
                          tasks=args.tasks)


if __name__ == "__main__":
    main()
