"""Anomaly labels from intensity change: the flipped-Gaussian labeller of "Many tasks make light work".

``y = 1 - exp(-x^2 / (2 sigma^2))`` where ``x`` is the absolute intensity change in units of the image's
foreground standard deviation (so ``x`` is the change on z-normalised intensities), counted only inside the
anomaly's mask. Unlike NSA's scaled logistic it is C1-continuous and exactly 0 for no change. Each anomaly's
region is then grey-closed and its holes filled (reconstruction by erosion), so that voxels an anomaly
enclosed but happened not to change (e.g. the centre of a sink) are labelled like their surroundings.
"""

from __future__ import annotations

import torch

__all__ = ["flipped_gaussian", "grey_dilate", "grey_erode", "cross_erode", "grey_close", "fill_holes", "label_region"]


def flipped_gaussian(x: torch.Tensor, sigma: float = 0.2) -> torch.Tensor:
    """``1 - exp(-x^2 / (2 sigma^2))``: 0 at 0, monotone in ``|x|``, tends to 1."""
    return -torch.expm1(-(x * x) / (2.0 * sigma * sigma))


def _filter_along(x: torch.Tensor, dim: int, op) -> torch.Tensor:
    """Running ``op`` (torch.maximum or torch.minimum) over each voxel and its two neighbours along ``dim``.

    Out-of-range neighbours are ignored. Elementwise slices: several times faster than ``max_pool3d``
    with stride 1 on the CPU, and it works for any number of dimensions.
    """
    n = x.shape[dim]
    if n < 2:
        return x
    y = x.clone()
    upper = y.narrow(dim, 1, n - 1)
    op(upper, x.narrow(dim, 0, n - 1), out=upper)
    lower = y.narrow(dim, 0, n - 1)
    op(lower, x.narrow(dim, 1, n - 1), out=lower)
    return y


def grey_dilate(x: torch.Tensor) -> torch.Tensor:
    """Maximum over the 3^N box around each voxel (separable)."""
    for d in range(x.ndim):
        x = _filter_along(x, d, torch.maximum)
    return x


def grey_erode(x: torch.Tensor) -> torch.Tensor:
    """Minimum over the 3^N box around each voxel (separable); the outside is ignored."""
    for d in range(x.ndim):
        x = _filter_along(x, d, torch.minimum)
    return x


def cross_erode(x: torch.Tensor) -> torch.Tensor:
    """Minimum over each voxel and its 2N face neighbours; the outside is ignored."""
    out = x
    for d in range(x.ndim):
        out = torch.minimum(out, _filter_along(x, d, torch.minimum))
    return out


def grey_close(x: torch.Tensor) -> torch.Tensor:
    """Grey closing with a 3^N box: dilation then erosion (never decreases a value)."""
    return torch.maximum(grey_erode(grey_dilate(x)), x)


def fill_holes(x: torch.Tensor, max_iterations: int | None = None) -> torch.Tensor:
    """Grey-level hole filling: morphological reconstruction by erosion from the array's border.

    The marker is ``x`` on the border and ``max(x)`` inside; it is eroded (and kept >= ``x``) until stable.
    Every regional minimum not connected to the border is raised to the level of its surroundings.
    """
    if x.numel() == 0 or min(x.shape) < 3:
        return x
    marker = torch.full_like(x, float(x.max()))
    border = torch.ones_like(x, dtype=torch.bool)
    border[(slice(1, -1),) * x.ndim] = False
    marker[border] = x[border]
    limit = max_iterations or sum(x.shape)
    for _ in range(limit):
        nxt = torch.maximum(grey_erode(marker), x)
        if torch.equal(nxt, marker):
            break
        marker = nxt
    return marker


def label_region(change: torch.Tensor, mask: torch.Tensor, sigma: float = 0.2) -> torch.Tensor:
    """Label of one anomaly's region from its normalised absolute change.

    Args:
        change: (*spatial) absolute intensity change in foreground-std units, over the anomaly's box
            including a one-voxel margin around the mask.
        mask: boolean (*spatial): the anomaly's mask in that box.
    Returns:
        (*spatial) labels in [0, 1].
    """
    y = flipped_gaussian(change * mask, sigma)
    return fill_holes(grey_close(y)).clamp_(0.0, 1.0)
