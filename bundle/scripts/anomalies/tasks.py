"""The synthetic anomaly tasks and the sampler that applies 1 to 4 of them to an image.

Tasks (names used in configs), from FPI (seed 002) and "Many tasks make light work" (seed 003):

- ``fpi``: foreign patch interpolation: inside the mask the image becomes ``(1 - a) x + a x'`` with a
  partner scan ``x'`` of the same dataset at the same location, ``a ~ U(0.05, 0.95)``.
- ``poisson_intra``: Poisson blending (mixed gradients) of a rotated, rescaled patch of a partner scan of
  the same dataset.
- ``poisson_inter``: the same with a patch of a scan from another dataset (the "foreign" scan).
- ``sink`` / ``source``: resample the image inside the mask from ``c + d u g(r)`` (paper Eq. 1 and 2), which
  pulls intensities towards (sink) or pushes them away from (source) a centre ``c``; it never samples
  outside the mask, so the deformation blends seamlessly.
- ``smooth_intensity``: add or subtract a magnitude over the mask, ramped in from the boundary.

Intensity scale: the engine normalises internally. It measures the image's foreground standard deviation
once per sample and expresses the labeller's change, the intensity-task magnitudes and the blended patch's
contrast in those units, so z-scored input reproduces the paper exactly and any affine rescaling of the
input (CT in Hounsfield units or in [0, 1]) gives the same anomalies and the same labels.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import randomness as rnd
from .labelling import cross_erode, grey_erode, label_region
from .poisson import poisson_blend
from .shapes import AnomalyShape, _rotation, place_shape, sample_shape

__all__ = [
    "TASKS",
    "TASK_NEEDS",
    "SampleContext",
    "synthesize",
    "intensity_scale",
    "default_foreground",
]

# A voxel counts as changed by a blend when it moved by more than this many foreground stds
# (the reference grows the labelled region to every such voxel inside the blend box).
CHANGE_TOLERANCE = 1e-3


@dataclass
class SampleContext:
    """Everything a task may read while anomalies are being added to one sample."""

    image: torch.Tensor  # (C, *spatial) current image, float
    gen: torch.Generator
    scale: float  # foreground std of the original image
    low: torch.Tensor  # (C, 1, ...) per-channel minimum of the original image
    high: torch.Tensor  # (C, 1, ...) per-channel maximum
    partner: torch.Tensor | None = None
    partner_foreground: torch.Tensor | None = None
    foreign: torch.Tensor | None = None
    foreign_foreground: torch.Tensor | None = None
    _sources: dict = field(default_factory=dict)

    def source(self, which: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(volume, its foreground voxel indices, its intensity scale) for "partner" or "foreign", cached."""
        if which not in self._sources:
            volume, fg = (self.partner, self.partner_foreground) if which == "partner" else (
                self.foreign, self.foreign_foreground)
            fg = default_foreground(volume) if fg is None else fg.to(device=volume.device, dtype=torch.bool)
            self._sources[which] = (volume, torch.nonzero(fg.reshape(volume.shape[1:])), intensity_scale(volume, fg))
        return self._sources[which]


@dataclass
class TaskResult:
    box: tuple[slice, ...]  # where the task wrote, in image coordinates
    values: torch.Tensor  # (C, *box) new image values
    mask: torch.Tensor  # boolean (*box): the region the label covers
    interpolation: float | None = None  # FPI's foreign fraction, for its optional label
    details: dict = field(default_factory=dict)  # the task's random parameters, reported in ``info``


def default_foreground(image: torch.Tensor) -> torch.Tensor:
    """Voxels that differ from the image's minimum in any channel (all voxels for a constant image)."""
    low = image.amin()
    tol = 1e-6 * float((image.amax() - low).abs()) + 1e-12
    fg = (image - low > tol).any(dim=0)
    return fg if bool(fg.any()) else torch.ones_like(fg)


def intensity_scale(image: torch.Tensor, foreground: torch.Tensor | None = None) -> float:
    """Standard deviation of the foreground intensities (1.0 when it is degenerate)."""
    if foreground is None:
        foreground = default_foreground(image)
    # Every second voxel per axis is plenty for a std and 8x cheaper on a 3D volume.
    step = (slice(None, None, 2),) * foreground.ndim
    values = image[(slice(None), *step)][:, foreground[step]]
    if values.numel() < 64:
        values = image[:, foreground]
    std = float(values.float().std()) if values.numel() > 1 else 0.0
    return std if math.isfinite(std) and std > 1e-12 else 1.0


def _grow(box: tuple[slice, ...], margin: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(max(sl.start - margin, 0), min(sl.stop + margin, n)) for sl, n in zip(box, shape))


def _embed(mask: torch.Tensor, inner: tuple[slice, ...], outer: tuple[slice, ...]) -> torch.Tensor:
    """Place ``mask`` (defined on ``inner``) into a zero array over ``outer`` (which contains ``inner``)."""
    out = torch.zeros([sl.stop - sl.start for sl in outer], dtype=mask.dtype, device=mask.device)
    out[tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))] = mask
    return out


def _sample(volume: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``volume`` (C, *spatial) at voxel coordinates ``coords`` (*out, D).

    Coordinates outside the volume take the nearest border value. Returns (C, *out).
    """
    nd = coords.shape[-1]
    sizes = torch.tensor(volume.shape[1:], dtype=coords.dtype, device=coords.device)
    grid = 2.0 * coords / (sizes - 1).clamp_min(1) - 1.0
    grid = grid.flip(-1)  # grid_sample wants (x, y, z) = last spatial axis first
    out_shape = coords.shape[:-1]
    grid = grid.reshape(1, *([1] * (nd - 1)), -1, nd)
    sampled = F.grid_sample(
        volume[None].to(coords.dtype), grid, mode="bilinear", padding_mode="border", align_corners=True
    )
    return sampled.reshape(volume.shape[0], *out_shape)


def _fpi(ctx: SampleContext, shape: AnomalyShape, box, mask) -> TaskResult:
    alpha = rnd.uniform(ctx.gen, 0.05, 0.95)
    region = ctx.image[(slice(None), *box)]
    other = ctx.partner[(slice(None), *box)].to(region)
    values = torch.where(mask, (1.0 - alpha) * region + alpha * other, region)
    return TaskResult(box, values, mask, interpolation=alpha, details={"interpolation": alpha})


def _source_patch(ctx: SampleContext, which: str, outer: tuple[slice, ...]) -> tuple[torch.Tensor, dict]:
    """A patch of the partner/foreign scan, rotated U(+-pi/4) per axis pair and scaled by (1 + Exp(0.1))
    or its inverse (capped at 0.8 of the source's size), resampled onto the ``outer`` box and brought to
    the target's contrast."""
    volume, fg_voxels, source_scale = ctx.source(which)
    nd = len(outer)
    src_shape = torch.tensor(volume.shape[1:], dtype=torch.float64)
    box_len = torch.tensor([sl.stop - sl.start for sl in outer], dtype=torch.float64)
    pairs = list(itertools.combinations(range(nd), 2))
    rot = _rotation(nd, rnd.uniforms(ctx.gen, len(pairs), -math.pi / 4, math.pi / 4))
    factor = 1.0 + rnd.exponential(ctx.gen, 0.1)
    scale = factor if rnd.coin(ctx.gen) else 1.0 / factor
    extent_unit = rot.abs() @ box_len  # source extent for scale 1
    scale = min(scale, float((0.8 * src_shape / extent_unit).min()))
    extent = scale * extent_unit
    lo, hi = extent / 2.0, (src_shape - 1 - extent / 2.0).clamp_min(extent / 2.0)
    # centre on a foreground voxel of the source that keeps the patch inside it (rejection sampling)
    centre = (lo + hi) / 2.0
    for _ in range(32):
        candidate = fg_voxels[rnd.randint(ctx.gen, fg_voxels.shape[0])].cpu().double()
        if bool(((candidate >= lo) & (candidate <= hi)).all()):
            centre = candidate
            break
    axes = [torch.arange(n, dtype=torch.float64) - (n - 1) / 2.0 for n in box_len.long().tolist()]
    offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    coords = centre + offsets @ (scale * rot).T
    work = ctx.image.dtype if ctx.image.dtype == torch.float64 else torch.float32
    patch = _sample(volume.to(ctx.image.device), coords.to(device=ctx.image.device, dtype=work))
    details = {"source_centre": tuple(float(c) for c in centre), "source_scale": scale}
    return patch * (ctx.scale / source_scale), details


def _poisson(which: str) -> Callable:
    def task(ctx: SampleContext, shape: AnomalyShape, box, mask) -> TaskResult:
        # one voxel of margin: the Dirichlet boundary of the blend
        outer = _grow(box, 1, tuple(ctx.image.shape[1:]))
        region = ctx.image[(slice(None), *outer)]
        patch, details = _source_patch(ctx, which, outer)
        patch = patch.to(region.dtype)
        blend_mask = _embed(mask, box, outer)
        blended = poisson_blend(region, patch, blend_mask, mix_gradients=True)
        blended = torch.minimum(torch.maximum(blended, ctx.low), ctx.high)
        # the solve may also alter voxels outside the shape: they are part of the anomaly (as in the reference)
        moved = (blended - region).abs().amax(dim=0) > CHANGE_TOLERANCE * ctx.scale
        return TaskResult(outer, blended, blend_mask | moved, details=details)

    return task


def _deform(profile: Callable[[torch.Tensor, float], torch.Tensor]) -> Callable:
    def task(ctx: SampleContext, shape: AnomalyShape, box, mask) -> TaskResult:
        region = ctx.image[(slice(None), *box)]
        exponent = 2.0 ** rnd.uniform(ctx.gen, 0.5, 2.0)
        local = torch.nonzero(mask)  # (M, D) voxel indices inside the box
        centre_local = local[rnd.randint(ctx.gen, local.shape[0])]
        work = torch.float64 if region.dtype == torch.float64 else torch.float32
        offset = torch.tensor([sl.start for sl in box], device=local.device)
        points = (local + offset).to(work)
        centre = (centre_local + offset).to(work)
        vec = points - centre
        dist = vec.norm(dim=-1)
        direction = torch.where(dist[:, None] > 0, vec / dist.clamp_min(1e-12)[:, None], torch.zeros_like(vec))
        direction[dist == 0, 0] = 1.0
        # d: distance to the boundary of the shape clipped to the image (both convex), so that p~ never
        # leaves the mask even where the image border cuts the shape
        to_image_border = _ray_to_box(centre, direction, ctx.image.shape[1:])
        radius = torch.minimum(shape.ray_to_boundary(centre, direction), to_image_border)
        radius = radius.clamp_min(1e-6)
        ratio = (dist / radius).clamp(0.0, 1.0)
        sample_at = centre + direction * (radius * profile(ratio, exponent))[:, None]
        values = region.clone()
        values[:, mask] = _sample(region, sample_at - offset.to(work)).to(region.dtype)
        details = {"deformation_centre": tuple((centre_local + offset).tolist()), "exponent": exponent}
        return TaskResult(box, values, mask, details=details)

    return task


def _ray_to_box(start: torch.Tensor, direction: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Distance from ``start`` along unit ``direction`` (..., D) to the border of the voxel grid."""
    upper = torch.tensor([n - 1 for n in spatial], dtype=direction.dtype, device=direction.device)
    safe = torch.where(direction.abs() < 1e-12, torch.full_like(direction, 1e-12), direction)
    limit = torch.where(safe > 0, (upper - start) / safe, -start / safe)
    return limit.amin(dim=-1).clamp_min(0.0)


def _sink_profile(r: torch.Tensor, f: float) -> torch.Tensor:
    return 1.0 - (1.0 - r) ** f  # Eq. 1: samples further out, pulls intensities in


def _source_profile(r: torch.Tensor, f: float) -> torch.Tensor:
    return r**f  # Eq. 2: samples closer in, pushes intensities out


def _inner_distance(mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximate distance (voxels) of mask voxels to the mask's outside, up to ``steps``.

    Counts surviving erosions, alternating box and cross structuring elements (an octagonal metric,
    within ~8 % of Euclidean), which is all a ramp needs and runs on any device.
    """
    current = mask.to(torch.float32)
    depth = current.clone()
    for i in range(steps):
        current = grey_erode(current) if i % 2 == 0 else cross_erode(current)
        if not bool(current.any()):
            break
        depth += current
    return depth


def _smooth_intensity(ctx: SampleContext, shape: AnomalyShape, box, mask) -> TaskResult:
    s = 0.2
    magnitude = (s / 2.0 + rnd.gamma(ctx.gen, 3, s)) * rnd.sign(ctx.gen) * ctx.scale
    margin = min(ctx.image.shape[1:]) * (0.02 + rnd.gamma(ctx.gen, 3, 0.01))
    outer = _grow(box, 1, tuple(ctx.image.shape[1:]))
    outer_mask = _embed(mask, box, outer)
    # the image border is not a boundary of the anomaly: pad the mask outside the image as inside
    depth = _inner_distance(outer_mask, steps=int(math.ceil(margin)))
    ramp = (depth / max(margin, 1.0)).clamp(0.0, 1.0)
    region = ctx.image[(slice(None), *outer)]
    values = region + (magnitude * ramp).to(region.dtype)
    return TaskResult(outer, values, outer_mask, details={"magnitude": magnitude, "margin": margin})


TASKS: dict[str, Callable] = {
    "fpi": _fpi,
    "poisson_intra": _poisson("partner"),
    "poisson_inter": _poisson("foreign"),
    "sink": _deform(_sink_profile),
    "source": _deform(_source_profile),
    "smooth_intensity": _smooth_intensity,
}

# Which extra scan a task needs: the partner (same dataset) or the foreign scan (another dataset).
TASK_NEEDS: dict[str, str | None] = {
    "fpi": "partner",
    "poisson_intra": "partner",
    "poisson_inter": "foreign",
    "sink": None,
    "source": None,
    "smooth_intensity": None,
}


def _as_channel_first(x: torch.Tensor | None, ndim: int, name: str) -> torch.Tensor | None:
    if x is None:
        return None
    if x.ndim == ndim:
        return x[None]
    if x.ndim != ndim + 1:
        raise ValueError(f"{name} must have {ndim} spatial dims (optionally channel-first), got {tuple(x.shape)}")
    return x


def synthesize(
    image: torch.Tensor,
    gen: torch.Generator,
    task: str,
    foreground: torch.Tensor | None = None,
    partner: torch.Tensor | None = None,
    foreign: torch.Tensor | None = None,
    *,
    partner_foreground: torch.Tensor | None = None,
    foreign_foreground: torch.Tensor | None = None,
    sigma: float = 0.2,
    max_anomalies: int = 4,
    continue_probability: float = 0.5,
    min_overlap: float = 0.5,
    min_size: float = 0.06,
    max_size: float = 0.8,
    interpolation_label: bool = False,
    foreground_voxels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Add 1 to ``max_anomalies`` anomalies of one task to ``image`` and label them.

    Args:
        image: (C, *spatial) with 2 or 3 spatial dims, any intensity scale (see the module docstring).
        gen: the only source of randomness.
        task: a key of ``TASKS``.
        foreground: boolean (*spatial); anomalies lie at least ``min_overlap`` inside it. Default: the
            voxels above the image's minimum.
        partner: (C, *spatial) another scan of the same dataset (``fpi``, ``poisson_intra``).
        foreign: (C, *any spatial) a scan of another dataset (``poisson_inter``).
        sigma: width of the flipped-Gaussian labeller, in foreground stds.
        interpolation_label: for ``fpi``, label with FPI's foreign fraction ``a`` where the two scans differ
            instead of the flipped-Gaussian labeller.
        foreground_voxels: precomputed ``nonzero(foreground)``, to save time over repeated calls.

    Returns:
        (anomalous image, label (1, *spatial) in [0, 1], info dict with the task and each anomaly's
        kind, centre, bounding box and the task's random parameters). Image and label keep ``image``'s device
        and floating dtype
        (integer images come back as float32).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available: {sorted(TASKS)}")
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be (C, H, W) or (C, H, W, D), got shape {tuple(image.shape)}")
    spatial = tuple(image.shape[1:])
    out_dtype = image.dtype if image.is_floating_point() else torch.float32
    work = image.to(torch.float64 if out_dtype == torch.float64 else torch.float32)
    need = TASK_NEEDS[task]
    partner = _as_channel_first(partner, len(spatial), "partner")
    foreign = _as_channel_first(foreign, len(spatial), "foreign")
    if need == "partner" and (partner is None or tuple(partner.shape[1:]) != spatial):
        raise ValueError(f"task {task!r} needs a partner scan with the image's spatial shape {spatial}")
    if need == "foreign" and foreign is None:
        raise ValueError(f"task {task!r} needs a foreign scan (another dataset)")
    if foreground is None:
        foreground = default_foreground(work)
    foreground = foreground.to(device=work.device, dtype=torch.bool).reshape(spatial)
    if not bool(foreground.any()):
        foreground = torch.ones_like(foreground)
        foreground_voxels = None
    if foreground_voxels is None:
        foreground_voxels = torch.nonzero(foreground)

    reduce_dims = tuple(range(1, work.ndim))
    ctx = SampleContext(
        image=work.clone(),
        gen=gen,
        scale=intensity_scale(work, foreground),
        low=work.amin(dim=reduce_dims, keepdim=True),
        high=work.amax(dim=reduce_dims, keepdim=True),
        partner=None if partner is None else partner.to(device=work.device, dtype=work.dtype),
        partner_foreground=partner_foreground,
        foreign=None if foreign is None else foreign.to(device=work.device, dtype=work.dtype),
        foreign_foreground=foreign_foreground,
    )
    apply = TASKS[task]
    results: list[TaskResult] = []
    info = {"task": task, "anomalies": []}
    for _ in range(max_anomalies):
        shape = sample_shape(spatial, gen, min_fraction=min_size, max_fraction=max_size)
        shape, box, mask = place_shape(shape, foreground, gen, foreground_voxels, min_overlap=min_overlap)
        result = apply(ctx, shape, box, mask)
        ctx.image[(slice(None), *result.box)] = result.values.to(ctx.image.dtype)
        results.append(result)
        info["anomalies"].append({"kind": shape.kind, "centre": shape.centre,
                                  "box": [(sl.start, sl.stop) for sl in box], **result.details})
        if not rnd.coin(gen, continue_probability):
            break

    label = torch.zeros(spatial, dtype=work.dtype, device=work.device)
    for result in results:
        region = _grow(result.box, 1, spatial)
        region_mask = _embed(result.mask, result.box, region)
        idx = (slice(None), *region)
        if interpolation_label and result.interpolation is not None:
            differs = (ctx.partner[idx] - work[idx]).abs().amax(dim=0) > CHANGE_TOLERANCE * ctx.scale
            region_label = (region_mask & differs).to(work.dtype) * result.interpolation
        else:
            change = (ctx.image[idx] - work[idx]).abs().mean(dim=0) / ctx.scale
            region_label = label_region(change, region_mask, sigma)
        label[region] = torch.maximum(label[region], region_label)
    return ctx.image.to(out_dtype), label[None].to(out_dtype), info
