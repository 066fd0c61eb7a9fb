"""Scalar random draws from an explicit ``torch.Generator`` (no global RNG anywhere in the engine).

All draws are made on the generator's own device in float64 and returned as Python numbers or small
CPU tensors, so a CPU generator gives identical anomalies whether the image lives on the CPU or a GPU.
"""

from __future__ import annotations

import math

import torch


def uniform(gen: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    u = torch.rand((), generator=gen, dtype=torch.float64, device=gen.device).item()
    return low + (high - low) * u


def uniforms(gen: torch.Generator, n: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    u = torch.rand((n,), generator=gen, dtype=torch.float64, device=gen.device).cpu()
    return low + (high - low) * u


def normals(gen: torch.Generator, n: int, std: float = 1.0) -> torch.Tensor:
    return std * torch.randn((n,), generator=gen, dtype=torch.float64, device=gen.device).cpu()


def randint(gen: torch.Generator, high: int) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, (), generator=gen, device=gen.device).item())


def coin(gen: torch.Generator, p: float = 0.5) -> bool:
    return uniform(gen) < p


def exponential(gen: torch.Generator, scale: float) -> float:
    return -scale * math.log1p(-uniform(gen))


def gamma(gen: torch.Generator, shape: int, scale: float) -> float:
    """Gamma(shape, scale) for an integer shape: the sum of ``shape`` exponentials.

    The paper's distributions all have integer shapes (2 or 3), and this keeps every draw on ``gen``
    (``torch.distributions`` cannot take a generator).
    """
    if shape < 1 or int(shape) != shape:
        raise ValueError(f"gamma() supports positive integer shapes only, got {shape}")
    return sum(exponential(gen, scale) for _ in range(int(shape)))


def sign(gen: torch.Generator) -> float:
    return 1.0 if coin(gen) else -1.0
