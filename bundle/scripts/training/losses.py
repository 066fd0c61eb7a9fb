"""Training losses on the network's logits against soft anomaly labels in [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["AnomalyLoss"]


class AnomalyLoss(torch.nn.Module):
    """``kind="mse"``: mean squared error of sigmoid(logits) to the label ("Many tasks make light work");
    ``kind="bce"``: binary cross-entropy with logits against the soft label (FPI)."""

    def __init__(self, kind: str = "mse") -> None:
        super().__init__()
        if kind not in ("mse", "bce"):
            raise ValueError(f"loss kind must be 'mse' or 'bce', got {kind!r}")
        self.kind = kind

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        label = label.to(logits.dtype)
        if self.kind == "bce":
            return F.binary_cross_entropy_with_logits(logits, label)
        return F.mse_loss(torch.sigmoid(logits), label)
