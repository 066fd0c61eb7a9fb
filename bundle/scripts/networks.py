"""Network helpers for the configs."""

from __future__ import annotations

import math

import torch

__all__ = ["with_output_prior"]


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
