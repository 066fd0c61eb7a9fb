"""Network helpers for the configs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer

__all__ = ["SLIDING_WINDOW_OVERLAP", "make_inferer", "with_output_prior"]

# nnU-Net's sliding-window setting (Isensee et al. 2021): windows overlap by half, Gaussian-weighted so that the
# centre of a window, where the network saw the most context, counts most
SLIDING_WINDOW_OVERLAP = 0.5


def make_inferer(patch_size: Sequence[int] | None, sliding_window: bool = False,
                 overlap: float = SLIDING_WINDOW_OVERLAP) -> Inferer:
    """How a network sees a whole scan: in one pass (SimpleInferer), or, when it was trained on ``patch_size``
    crops of the working grid and ``sliding_window`` is set, in MONAI's SlidingWindowInferer over windows of that
    size (for grids whose one pass does not fit the memory). The network is convolutional, so it takes the whole
    grid either way; on synthetic validation one pass scored higher (docs: "Patches at the native resolution")."""
    if not patch_size or not sliding_window:
        return SimpleInferer()
    return SlidingWindowInferer(roi_size=[int(s) for s in patch_size], sw_batch_size=1, overlap=overlap,
                                mode="gaussian")


def with_output_prior(network: torch.nn.Module, prior: float = 0.01) -> torch.nn.Module:
    """Start the network at a small anomaly probability: set the bias of its last convolution to the
    logit of ``prior`` (the RetinaNet prior initialisation).

    Anomalous voxels are rare, and a network that starts at sigmoid(0) = 0.5 everywhere spends its first
    thousands of Adam steps (about lr per step on that bias) only learning to say "normal" before it can
    learn where anomalies are. ``prior=None`` keeps the default initialisation.
    """
    if prior is None:
        return network
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior must be in (0, 1), got {prior}")
    last = [m for m in network.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)][-1]
    if last.bias is None:
        raise ValueError(f"the network's last convolution {last} has no bias to initialise")
    with torch.no_grad():
        last.bias.fill_(math.log(prior / (1.0 - prior)))
    return network
