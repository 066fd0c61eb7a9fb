"""Random anomaly shapes: size recipe, placement in the foreground, rasterisation, ray to boundary."""

from __future__ import annotations

import pytest
import torch

from scripts.anomalies import place_shape, rasterise, sample_shape


@pytest.mark.parametrize("spatial", [(64, 48), (40, 36, 32)], ids=["2d", "3d"])
def test_sizes_follow_the_recipe(spatial):
    # matrix = rotation @ unit-triangular shear @ diag(half sizes): |det| is the product of the half sizes,
    # each in [0.03, 0.4] x dim (full size in [0.06, 0.8] x dim)
    lo = torch.tensor([0.03 * n for n in spatial], dtype=torch.float64).prod()
    hi = torch.tensor([0.4 * n for n in spatial], dtype=torch.float64).prod()
    volumes = []
    for seed in range(60):
        shape = sample_shape(spatial, torch.Generator().manual_seed(seed))
        volume = abs(float(torch.linalg.det(shape.matrix)))
        assert lo * (1 - 1e-9) <= volume <= hi * (1 + 1e-9)
        volumes.append(volume)
    # Gamma(2, 0.1) sizes: mostly small, sometimes large
    assert min(volumes) < 0.05 * hi and max(volumes) > 0.01 * hi


def test_rotation_and_shear_vary_between_draws():
    dets, kinds = set(), set()
    for seed in range(30):
        shape = sample_shape((50, 50, 50), torch.Generator().manual_seed(seed))
        kinds.add(shape.kind)
        dets.add(round(float(shape.matrix[0, 1]), 6))
    assert kinds == {"ellipsoid", "rectangle"}
    assert len(dets) == 30


@pytest.mark.parametrize("spatial", [(60, 50), (30, 34, 28)], ids=["2d", "3d"])
def test_placement_puts_at_least_half_in_a_small_foreground(spatial):
    foreground = torch.zeros(spatial, dtype=torch.bool)
    # a small off-centre foreground: most random placements would fall outside it
    foreground[tuple(slice(2, n // 3) for n in spatial)] = True
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        shape = sample_shape(spatial, gen)
        placed, box, mask = place_shape(shape, foreground, gen)
        assert mask.any()
        overlap = (mask & foreground[box]).sum() / mask.sum()
        assert overlap >= 0.5
        assert foreground[tuple(placed.centre)]


def test_placement_rejects_empty_foreground():
    with pytest.raises(ValueError, match="foreground mask is empty"):
        place_shape(sample_shape((10, 10), torch.Generator()), torch.zeros(10, 10, dtype=torch.bool), torch.Generator())


@pytest.mark.parametrize("kind", ["ellipsoid", "rectangle"])
def test_rasterise_matches_the_analytic_shape_and_rays_end_on_its_boundary(kind):
    spatial = (40, 40, 40)
    gen = torch.Generator().manual_seed(5)
    shape = sample_shape(spatial, gen)
    while shape.kind != kind:
        shape = sample_shape(spatial, gen)
    shape = shape.at((20, 20, 20))
    box, mask = rasterise(shape, spatial)
    inv = torch.linalg.inv(shape.matrix)
    idx = torch.nonzero(mask).double() + torch.tensor([sl.start for sl in box], dtype=torch.float64)
    q = (idx - torch.tensor(shape.centre, dtype=torch.float64)) @ inv.T
    assert (shape.unit_norm(q) <= 1 + 1e-5).all()
    # rays from an inside point end exactly on the boundary (unit norm 1)
    start = torch.tensor(shape.centre, dtype=torch.float64) + 0.3 * shape.matrix[:, 0]
    directions = torch.nn.functional.normalize(torch.randn(100, 3, generator=gen, dtype=torch.float64), dim=1)
    t = shape.ray_to_boundary(start, directions)
    end = start + directions * t[:, None]
    norm = shape.unit_norm((end - torch.tensor(shape.centre, dtype=torch.float64)) @ inv.T)
    assert torch.allclose(norm, torch.ones_like(norm), atol=1e-9)
