"""Random anomaly shapes: hyper-ellipsoids and hyper-rectangles, sized, sheared and rotated in N-D.

Recipe of "Many tasks make light work" (Baugh et al., MICCAI 2023, arXiv:2307.13986): per-axis size
``(0.03 + Gamma(2, 0.1)) * dim`` clipped to ``[0.06, 0.8] * dim``; shear ``N(0, 0.2)``; a rotation
``U(-pi/2, pi/2)`` in every axis pair; placed so that at least half of the shape lies in the foreground.

A shape is the image of the unit ball (L2 for an ellipsoid, L-infinity for a rectangle) under the affine
map ``p = centre + matrix @ q``; rasterising it only touches its bounding box.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from . import randomness as rnd

__all__ = ["AnomalyShape", "sample_shape", "place_shape", "rasterise"]

SHAPE_KINDS = ("ellipsoid", "rectangle")


@dataclass(frozen=True)
class AnomalyShape:
    kind: str  # "ellipsoid" or "rectangle"
    matrix: torch.Tensor  # (D, D) float64: unit-ball coordinates -> voxel offsets
    centre: tuple[int, ...] = ()

    @property
    def half_extent(self) -> torch.Tensor:
        """Half size of the axis-aligned bounding box, per axis, in voxels."""
        if self.kind == "ellipsoid":
            return self.matrix.pow(2).sum(dim=1).sqrt()
        return self.matrix.abs().sum(dim=1)

    def at(self, centre: tuple[int, ...]) -> AnomalyShape:
        return AnomalyShape(self.kind, self.matrix, tuple(int(c) for c in centre))

    def scaled(self, factor: float) -> AnomalyShape:
        return AnomalyShape(self.kind, self.matrix * factor, self.centre)

    def unit_norm(self, q: torch.Tensor) -> torch.Tensor:
        """Norm whose unit ball is the shape, for unit coordinates ``q`` (..., D)."""
        return q.norm(dim=-1) if self.kind == "ellipsoid" else q.abs().amax(dim=-1)

    def ray_to_boundary(self, start: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """Distance (voxels) from ``start`` along unit ``direction`` to the shape's boundary.

        ``start`` (D,) lies inside the shape; ``direction`` is (..., D) with unit rows. Exact for both kinds.
        """
        inv = torch.linalg.inv(self.matrix).to(direction)
        q0 = inv @ (start.to(direction) - torch.tensor(self.centre, dtype=direction.dtype, device=direction.device))
        w = direction @ inv.T
        if self.kind == "ellipsoid":
            a = (w * w).sum(-1)
            b = (w * q0).sum(-1)
            c = (q0 * q0).sum() - 1.0
            return (-b + torch.sqrt((b * b - a * c).clamp_min(0.0))) / a.clamp_min(1e-12)
        # rectangle: first face hit along the ray, |q0_i + t w_i| = 1
        w_safe = torch.where(w.abs() < 1e-12, torch.full_like(w, 1e-12), w)
        t_face = (torch.sign(w_safe) - q0) / w_safe
        return t_face.amin(dim=-1).clamp_min(0.0)


def _rotation(ndim: int, angles: torch.Tensor) -> torch.Tensor:
    rot = torch.eye(ndim, dtype=torch.float64)
    for (i, j), angle in zip(itertools.combinations(range(ndim), 2), angles.tolist()):
        givens = torch.eye(ndim, dtype=torch.float64)
        c, s = math.cos(angle), math.sin(angle)
        givens[i, i], givens[i, j], givens[j, i], givens[j, j] = c, -s, s, c
        rot = givens @ rot
    return rot


def sample_shape(
    spatial_shape: tuple[int, ...],
    gen: torch.Generator,
    min_fraction: float = 0.06,
    max_fraction: float = 0.8,
    shear_std: float = 0.2,
) -> AnomalyShape:
    """Draw a random shape (not yet placed) for an image of ``spatial_shape``."""
    ndim = len(spatial_shape)
    kind = SHAPE_KINDS[rnd.randint(gen, 2)]
    sizes = []
    for dim in spatial_shape:
        frac = 0.03 + rnd.gamma(gen, 2, 0.1)
        sizes.append(min(max(frac, min_fraction), max_fraction) * dim)
    half = torch.tensor(sizes, dtype=torch.float64) / 2.0
    shear = torch.eye(ndim, dtype=torch.float64)
    pairs = list(itertools.combinations(range(ndim), 2))
    for (i, j), value in zip(pairs, rnd.normals(gen, len(pairs), shear_std).tolist()):
        shear[i, j] = value
    rotation = _rotation(ndim, rnd.uniforms(gen, len(pairs), -math.pi / 2, math.pi / 2))
    return AnomalyShape(kind, rotation @ shear @ torch.diag(half))


def rasterise(
    shape: AnomalyShape, spatial_shape: tuple[int, ...], device=None
) -> tuple[tuple[slice, ...], torch.Tensor]:
    """Voxelise a placed shape: (slices of its bounding box clipped to the image, boolean mask in that box).

    The centre voxel always belongs to the shape, so the mask is never empty.
    """
    reach = torch.ceil(shape.half_extent).long().tolist()
    box = tuple(
        slice(max(c - r, 0), min(c + r + 1, n)) for c, r, n in zip(shape.centre, reach, spatial_shape)
    )
    axes = [torch.arange(sl.start, sl.stop, dtype=torch.float32, device=device) - c for sl, c in zip(box, shape.centre)]
    offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    inv = torch.linalg.inv(shape.matrix).to(device=device, dtype=torch.float32)
    mask = shape.unit_norm(offsets @ inv.T) <= 1.0
    centre_local = tuple(c - sl.start for c, sl in zip(shape.centre, box))
    mask[centre_local] = True
    return box, mask


def place_shape(
    shape: AnomalyShape,
    foreground: torch.Tensor,
    gen: torch.Generator,
    foreground_voxels: torch.Tensor | None = None,
    min_overlap: float = 0.5,
    tries_per_scale: int = 8,
    shrink: float = 0.8,
) -> tuple[AnomalyShape, tuple[slice, ...], torch.Tensor]:
    """Centre ``shape`` on a random foreground voxel so that >= ``min_overlap`` of it is foreground.

    After ``tries_per_scale`` failed centres the shape shrinks by ``shrink``; a shape small enough always
    fits around a foreground voxel, so this terminates for any non-empty foreground.

    Returns the placed shape, its bounding-box slices and its mask within that box.
    """
    if foreground_voxels is None:
        foreground_voxels = torch.nonzero(foreground)
    if foreground_voxels.shape[0] == 0:
        raise ValueError("cannot place an anomaly: the foreground mask is empty")
    spatial_shape = tuple(foreground.shape)
    attempt = 0
    while True:
        centre = foreground_voxels[rnd.randint(gen, foreground_voxels.shape[0])].tolist()
        placed = shape.at(centre)
        box, mask = rasterise(placed, spatial_shape, device=foreground.device)
        inside = (mask & foreground[box]).sum()
        if inside >= min_overlap * mask.sum():
            return placed, box, mask
        attempt += 1
        if attempt % tries_per_scale == 0:
            shape = shape.scaled(shrink)
