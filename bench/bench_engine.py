"""Benchmark of the synthetic-anomaly engine (``bundle/scripts/anomalies``).

Run from the repository root::

    PYTHONPATH=bundle .venv/bin/python bench/bench_engine.py [--repeats N] [--quick] [--json PATH]

Measures (median wall-clock times over several runs after a warm-up, ``time.perf_counter``):

(a) one full training sample: ``synthesize`` with a task drawn uniformly from all six tasks per run on a
    128^3 volume, single-threaded torch. Volumes come from ``tools.phantoms`` (the MNI152 brain, a
    partner brain, a z-scored CT phantom as the foreign scan). Target: median <= 100 ms.
(b) ``poisson_blend`` of a 64^3 box mask in the middle of a 128^3 random volume, mixed gradients off and
    on, single-threaded, against a numpy/scipy reference implementation of the same algorithm written
    below (``scipy.fft.dstn``/``idstn`` type 1, orthonormal, ``workers=1``). Target: reference time /
    torch time >= 1. The two results must agree to < 1e-4 of the image range.
(c) the same blend on CUDA when available (float32, synchronised), speed-up over (b)'s torch CPU time.
    Target: >= 10x.

Prints markdown tables and writes JSON (default ``bench/results/engine.json``).
"""

from __future__ import annotations

import os

# Single-threaded numerical libraries: must be set before numpy/scipy/torch load their thread pools.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.fft  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "bundle") not in sys.path:
    sys.path.insert(0, str(REPO / "bundle"))
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))  # the tools (tools.phantoms)

from scripts.anomalies import TASKS, poisson_blend, synthesize  # noqa: E402
from scripts.io.files import save_json  # noqa: E402
from tools import phantoms  # noqa: E402

SIZE = 128
BOX = 64
SYNTH_TARGET_MS = 100.0
RATIO_TARGET = 1.0
CUDA_TARGET = 10.0
AGREEMENT_TOL = 1e-4


# --------------------------------------------------------------------------------------------------------
# numpy/scipy reference of the Poisson blend (written for this benchmark from the algorithm's description)
# --------------------------------------------------------------------------------------------------------
def _along(nd: int, axis: int, sl: slice, rest: slice = slice(None)) -> tuple[slice, ...]:
    """Index tuple taking ``sl`` on ``axis`` and ``rest`` on every other axis."""
    return tuple(sl if i == axis else rest for i in range(nd))


def reference_poisson_blend(
    target: np.ndarray, source: np.ndarray, mask: np.ndarray, mix_gradients: bool = False, workers: int = 1
) -> np.ndarray:
    """Poisson image editing of ``source`` into ``target`` over ``mask`` (all ``(*spatial)``), numpy/scipy.

    Solved on the bounding box of the mask grown by one voxel; that box's outer layer is the Dirichlet
    boundary (held at ``target``). The guidance on the edge (p, p + e_d) is the source's forward difference
    (with mixing: the larger in magnitude of source and target differences) when p or p + e_d is in the
    mask, the target's otherwise. The right-hand side is the backward-difference divergence of the guidance
    at the interior voxels minus the boundary voxels' share of the Laplacian; the Laplacian is inverted
    with an orthonormal DST-I.
    """
    result = target.copy()
    nd = mask.ndim
    box = []
    for d in range(nd):
        hits = np.flatnonzero(mask.any(axis=tuple(i for i in range(nd) if i != d)))
        if hits.size == 0:
            return result
        box.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, mask.shape[d])))
    box = tuple(box)
    if any(sl.stop - sl.start < 3 for sl in box):
        return result

    t, s, m = target[box], source[box], mask[box]
    interior = (slice(1, -1),) * nd
    rhs = np.zeros([n - 2 for n in t.shape], dtype=t.dtype)
    for d in range(nd):
        head, tail = _along(nd, d, slice(None, -1)), _along(nd, d, slice(1, None))
        dt = t[tail] - t[head]
        ds = s[tail] - s[head]
        if mix_gradients:
            ds = np.where(np.abs(ds) > np.abs(dt), ds, dt)
        v = np.where(m[head] | m[tail], ds, dt)  # guidance on the n_d - 1 edges along d
        v = v[_along(nd, d, slice(None), slice(1, -1))]  # interior positions on the other axes
        rhs += v[tail] - v[head]  # divergence at interior voxel p: v(p) - v(p - e_d)

    # Dirichlet data: the box with its interior zeroed; its Laplacian at the interior voxels is just the sum
    # of the boundary neighbours, which moves to the right-hand side.
    frame = t.copy()
    frame[interior] = 0
    for d in range(nd):
        rhs -= frame[_along(nd, d, slice(2, None), slice(1, -1))]
        rhs -= frame[_along(nd, d, slice(None, -2), slice(1, -1))]

    eig = np.zeros(rhs.shape, dtype=np.float64)
    for d, n in enumerate(rhs.shape):
        k = np.arange(n, dtype=np.float64)
        shape = [1] * nd
        shape[d] = n
        eig = eig + (2.0 * np.cos(np.pi * (k + 1) / (n + 1)) - 2.0).reshape(shape)
    coef = scipy.fft.dstn(rhs, type=1, norm="ortho", workers=workers)
    solution = scipy.fft.idstn(coef / eig.astype(rhs.dtype), type=1, norm="ortho", workers=workers)
    result[tuple(slice(sl.start + 1, sl.stop - 1) for sl in box)] = solution.astype(target.dtype)
    return result


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------
def median_ms(*fns: Callable[[], object], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None):
    """Median wall-clock milliseconds of each ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs.

    Several functions are timed interleaved (one run of each per round), so that a change in background
    load affects all of them alike and their ratio stays meaningful. Returns (medians, all times).
    """
    sync = sync or (lambda: None)
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times, strict=True):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            acc.append(1e3 * (time.perf_counter() - start))
    return [statistics.median(t) for t in times], times


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _channel_first(volume) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(volume, dtype=np.float32))
    return t[None] if t.ndim == 3 else t


def make_volumes(size: int, seed: int):
    """(image, foreground, partner, foreign, description) for the synthesize benchmark: the MNI152 brain,
    a deformed partner brain, and the CT phantom z-scored as the foreign scan."""
    vol, fg = phantoms.mni152_brain(size)
    image, foreground = _channel_first(vol), torch.as_tensor(np.asarray(fg, dtype=bool))
    p_vol, _ = phantoms.brain_partner(vol, fg, seed)
    ct, ct_fg = phantoms.ct_phantom(size, seed)
    partner = _channel_first(p_vol)
    foreign = _channel_first(phantoms.zscore(ct, ct_fg))
    desc = f"tools.phantoms: mni152_brain({size}), brain_partner, ct_phantom({size}) z-scored"
    return image.contiguous(), foreground.reshape(image.shape[1:]), partner.contiguous(), foreign, desc


# --------------------------------------------------------------------------------------------------------
# benchmarks
# --------------------------------------------------------------------------------------------------------
def bench_synthesize(runs: int, seed: int) -> dict:
    image, foreground, partner, foreign, desc = make_volumes(SIZE, seed)
    tasks = sorted(TASKS)

    def one(task: str, run_seed: int) -> int:
        gen = torch.Generator().manual_seed(run_seed)
        _, _, info = synthesize(image, gen, task, foreground, partner=partner, foreign=foreign)
        return len(info["anomalies"])

    for i, task in enumerate(tasks):  # warm-up: every code path once
        one(task, 10_000 + i)
    picker = random.Random(seed)
    per_task: dict[str, list[float]] = {t: [] for t in tasks}
    counts: dict[str, list[int]] = {t: [] for t in tasks}
    all_times = []
    for run in range(runs):
        task = tasks[picker.randrange(len(tasks))]
        start = time.perf_counter()
        n = one(task, seed * 1_000_003 + run)
        ms = 1e3 * (time.perf_counter() - start)
        all_times.append(ms)
        per_task[task].append(ms)
        counts[task].append(n)
    return {
        "volumes": desc,
        "shape": list(image.shape),
        "runs": runs,
        "median_ms": statistics.median(all_times),
        "target_ms": SYNTH_TARGET_MS,
        "times_ms": all_times,
        "per_task": {
            t: {
                "runs": len(per_task[t]),
                "median_ms": statistics.median(per_task[t]) if per_task[t] else None,
                "mean_anomalies": statistics.mean(counts[t]) if counts[t] else None,
            }
            for t in tasks
        },
    }


def bench_poisson(repeats: int, seed: int, accelerator: str | None = None) -> dict:
    """(b) torch CPU vs numpy/scipy reference, and (c) ``accelerator`` (default: CUDA if available)."""
    if accelerator is None and torch.cuda.is_available():
        accelerator = "cuda"
    rng = np.random.default_rng(seed)
    target_np = rng.random((SIZE,) * 3, dtype=np.float32)
    source_np = rng.random((SIZE,) * 3, dtype=np.float32)
    mask_np = np.zeros((SIZE,) * 3, dtype=bool)
    lo = (SIZE - BOX) // 2
    mask_np[(slice(lo, lo + BOX),) * 3] = True
    target, source, mask = (torch.from_numpy(a) for a in (target_np, source_np, mask_np))
    image_range = float(target_np.max() - target_np.min())

    out: dict = {"volume": SIZE, "box": BOX, "dtype": "float32", "cpu": {}, "cuda": None}
    cuda = accelerator is not None
    if cuda:
        dev = torch.device(accelerator)
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)
        out["cuda"] = {"device": name}
        target_c, source_c, mask_c = target.to(dev), source.to(dev), mask.to(dev)
    for mix in (False, True):
        key = "mix_on" if mix else "mix_off"
        (torch_ms, ref_ms), _ = median_ms(
            lambda mix=mix: poisson_blend(target, source, mask, mix_gradients=mix),
            lambda mix=mix: reference_poisson_blend(target_np, source_np, mask_np, mix, workers=1),
            repeats=2 * repeats,
        )
        got = poisson_blend(target, source, mask, mix_gradients=mix).numpy()
        want = reference_poisson_blend(target_np, source_np, mask_np, mix, workers=1)
        diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
        out["cpu"][key] = {
            "torch_ms": torch_ms,
            "reference_ms": ref_ms,
            "ratio_reference_over_torch": ref_ms / torch_ms,
            "max_abs_diff": diff,
            "max_abs_diff_relative_to_range": diff / image_range,
            "agree": diff / image_range < AGREEMENT_TOL,
        }
        if cuda:
            sync = torch.cuda.synchronize if dev.type == "cuda" else None
            (cuda_ms,), _ = median_ms(
                lambda mix=mix: poisson_blend(target_c, source_c, mask_c, mix_gradients=mix),
                repeats=max(2 * repeats, 20),
                warmup=3,
                sync=sync,
            )
            got_c = poisson_blend(target_c, source_c, mask_c, mix_gradients=mix).cpu().numpy()
            diff_c = float(np.abs(got_c.astype(np.float64) - want.astype(np.float64)).max())
            out["cuda"][key] = {
                "cuda_ms": cuda_ms,
                "cpu_torch_ms": torch_ms,
                "speedup_vs_cpu": torch_ms / cuda_ms,
                "max_abs_diff_vs_reference": diff_c,
            }
    return out


# --------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------
def _ok(flag: bool) -> str:
    return "ok" if flag else "MISS"


def report(results: dict) -> str:
    meta, syn, poi = results["meta"], results["synthesize"], results["poisson"]
    lines = [
        f"# Engine benchmark ({meta['date']})",
        "",
        f"torch {meta['torch']} | numpy {meta['numpy']} | scipy {meta['scipy']} | torch threads "
        f"{meta['torch_threads']} | CPU: {meta['cpu']} ({meta['cpu_count']} logical cores)",
        f"volumes: {syn['volumes']}",
        "",
        f"## (a) synthesize, one training sample, {SIZE}^3, 1 thread",
        "",
        "| task | runs | median ms | mean anomalies |",
        "| --- | ---: | ---: | ---: |",
    ]
    for task, r in syn["per_task"].items():
        med = "-" if r["median_ms"] is None else f"{r['median_ms']:.1f}"
        anomalies = "-" if r["mean_anomalies"] is None else f"{r['mean_anomalies']:.2f}"
        lines.append(f"| {task} | {r['runs']} | {med} | {anomalies} |")
    ok = syn["median_ms"] <= SYNTH_TARGET_MS
    lines.append(
        f"| **all (uniform task)** | {syn['runs']} | **{syn['median_ms']:.1f}** | target <= "
        f"{SYNTH_TARGET_MS:.0f} ms: {_ok(ok)} |"
    )
    lines += [
        "",
        f"## (b, c) poisson_blend, {BOX}^3 box mask in a {SIZE}^3 float32 volume, 1 CPU thread",
        "",
        "| mixed gradients | torch CPU ms | numpy/scipy ms | ratio ref/torch (>= 1) | max abs diff / range "
        "| CUDA ms | CUDA speed-up (>= 10) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, label in (("mix_off", "off"), ("mix_on", "on")):
        c = poi["cpu"][key]
        g = None if poi["cuda"] is None else poi["cuda"][key]
        ratio = c["ratio_reference_over_torch"]
        cuda_ms = "n/a" if g is None else f"{g['cuda_ms']:.2f}"
        speed = "n/a" if g is None else f"{g['speedup_vs_cpu']:.1f}x {_ok(g['speedup_vs_cpu'] >= CUDA_TARGET)}"
        lines.append(
            f"| {label} | {c['torch_ms']:.1f} | {c['reference_ms']:.1f} | {ratio:.3f} "
            f"{_ok(ratio >= RATIO_TARGET)} | {c['max_abs_diff_relative_to_range']:.1e} "
            f"{_ok(c['agree'])} | {cuda_ms} | {speed} |"
        )
    lines.append("")
    lines.append("CUDA: not available" if poi["cuda"] is None else f"CUDA: {poi['cuda']['device']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="repeats (default 30; 5 with --quick): synthesize runs 6x this, poisson_blend 2x",
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "engine.json")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 30)
    if repeats < 1:
        parser.error("--repeats must be >= 1")

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "scipy_fft_workers": 1,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "repeats": repeats,
        "seed": args.seed,
    }
    start = time.perf_counter()
    results = {
        "meta": meta,
        "synthesize": bench_synthesize(6 * repeats, args.seed),
        "poisson": bench_poisson(repeats, args.seed),
    }
    meta["wall_s"] = time.perf_counter() - start
    print(report(results))
    print(f"\nwall time {meta['wall_s']:.1f} s")
    save_json(results, args.json)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
