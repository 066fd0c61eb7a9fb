"""poisson_blend: exactness against a direct sparse solve, Laplacian identity, invariances, shapes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sparse
import scipy.sparse.linalg as sparse_linalg
import torch

from scripts.anomalies import dst1, poisson_blend


def reference_sparse_blend(target: np.ndarray, source: np.ndarray, mask: np.ndarray, mix: bool) -> np.ndarray:
    """Poisson image editing by an explicit sparse linear system, voxel by voxel (slow, obviously right).

    Unknowns: the bounding box of the mask; Dirichlet boundary: the target one voxel around it. For each
    unknown p: sum over axes and both directions of (f(q) - f(p)) = sum of the guided differences
    v(p->q), where an edge takes the source difference (or the larger of source/target when mixing) when
    either end is in the mask, and the target difference otherwise.
    """
    nd = mask.ndim
    idx = np.argwhere(mask)
    lo, hi = np.maximum(idx.min(0), 1), np.minimum(idx.max(0), np.array(mask.shape) - 2)
    unknowns = [tuple(p) for p in itertools.product(*[range(a, b + 1) for a, b in zip(lo, hi)])]
    index = {p: i for i, p in enumerate(unknowns)}
    rows, cols, vals, rhs = [], [], [], np.zeros(len(unknowns))
    for i, p in enumerate(unknowns):
        for d, step in itertools.product(range(nd), (-1, 1)):
            q = list(p)
            q[d] += step
            q = tuple(q)
            dt, ds = target[q] - target[p], source[q] - source[p]
            if mix:
                ds = ds if abs(ds) > abs(dt) else dt
            guide = ds if (mask[p] or mask[q]) else dt
            rows.append(i), cols.append(i), vals.append(-1.0)
            if q in index:
                rows.append(i), cols.append(index[q]), vals.append(1.0)
                rhs[i] += guide
            else:
                rhs[i] += guide - target[q]
    matrix = sparse.csr_matrix((vals, (rows, cols)), shape=(len(unknowns),) * 2)
    solution = sparse_linalg.spsolve(matrix, rhs)
    out = target.copy()
    for p, v in zip(unknowns, solution):
        out[p] = v
    return out


def random_blob(shape, seed):
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, dtype=bool)
    centre = np.array(shape) // 2
    for _ in range(4):
        c = centre + rng.integers(-2, 3, size=len(shape))
        r = rng.integers(1, 3)
        box = tuple(slice(max(ci - r, 1), ci + r + 1) for ci in c)
        mask[box] = True
    return mask


@pytest.mark.parametrize("shape", [(14, 13), (9, 10, 8)], ids=["2d", "3d"])
@pytest.mark.parametrize("mix", [False, True], ids=["plain", "mixed"])
def test_matches_direct_sparse_solve(shape, mix):
    rng = np.random.default_rng(0)
    target, source = rng.normal(size=shape), rng.normal(size=shape) * 2 + 1
    mask = random_blob(shape, seed=1)
    expected = reference_sparse_blend(target, source, mask, mix)
    got = poisson_blend(torch.tensor(target), torch.tensor(source), torch.tensor(mask), mix_gradients=mix)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4)
    got32 = poisson_blend(torch.tensor(target).float(), torch.tensor(source).float(), torch.tensor(mask), mix)
    np.testing.assert_allclose(got32.numpy(), expected, atol=1e-4)


def discrete_laplacian(x: torch.Tensor) -> torch.Tensor:
    nd = x.ndim
    inner = (slice(1, -1),) * nd
    out = -2.0 * nd * x[inner]
    for d in range(nd):
        for sl in (slice(2, None), slice(None, -2)):
            out = out + x[tuple(sl if i == d else slice(1, -1) for i in range(nd))]
    return out


@pytest.mark.parametrize("shape", [(20, 18), (12, 14, 10)], ids=["2d", "3d"])
def test_interior_laplacian_equals_source_for_box_mask(shape):
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(shape, generator=gen, dtype=torch.float64)
    source = torch.rand(shape, generator=gen, dtype=torch.float64) * 3
    mask = torch.zeros(shape, dtype=torch.bool)
    box = tuple(slice(3, n - 4) for n in shape)
    mask[box] = True
    blended = poisson_blend(target, source, mask)
    inner_box = tuple(slice(b.start - 1, b.stop - 1) for b in box)  # laplacian arrays drop one voxel
    diff = discrete_laplacian(blended)[inner_box] - discrete_laplacian(source)[inner_box]
    assert diff.abs().max() < 1e-9
    # and it is not trivially the source: the boundary pins it to the target
    assert (blended[box] - source[box]).abs().max() > 0.1


def test_source_equal_to_target_plus_constant_returns_target():
    gen = torch.Generator().manual_seed(1)
    target = torch.rand(3, 16, 15, 14, generator=gen, dtype=torch.float64)
    mask = torch.from_numpy(random_blob((16, 15, 14), seed=3))
    for mix in (False, True):
        out = poisson_blend(target, target + 7.5, mask, mix_gradients=mix)
        assert torch.allclose(out, target, atol=1e-10)


def test_mixed_gradients_keep_target_texture_under_a_flat_source():
    gen = torch.Generator().manual_seed(2)
    target = torch.rand(30, 30, generator=gen, dtype=torch.float64)
    source = torch.full_like(target, 3.0)
    mask = torch.zeros(30, 30, dtype=torch.bool)
    mask[8:20, 9:22] = True
    mixed = poisson_blend(target, source, mask, mix_gradients=True)
    plain = poisson_blend(target, source, mask, mix_gradients=False)
    assert torch.allclose(mixed, target, atol=1e-10)  # target gradients are always the stronger
    # plain cloning of a flat source gives a harmonic (smooth) patch: the texture is gone
    assert discrete_laplacian(plain)[8:18, 9:20].abs().max() < 1e-9
    assert (plain - target)[mask].abs().max() > 0.2


def test_outside_bounding_box_untouched_and_channels_blended_independently():
    gen = torch.Generator().manual_seed(3)
    target = torch.rand(2, 32, 32, 32, generator=gen)
    source = torch.rand(2, 32, 32, 32, generator=gen)
    mask = torch.zeros(32, 32, 32, dtype=torch.bool)
    mask[10:18, 12:20, 5:9] = True
    out = poisson_blend(target, source, mask)
    outside = torch.ones_like(mask)
    outside[10:18, 12:20, 5:9] = False
    assert torch.equal(out[:, outside], target[:, outside])
    assert out.dtype == target.dtype and out.shape == target.shape
    single = poisson_blend(target[1], source[1], mask)
    assert torch.allclose(out[1], single, atol=1e-6)


def test_mask_at_the_image_border_and_empty_mask():
    target = torch.rand(10, 10, dtype=torch.float64)
    source = torch.rand(10, 10, dtype=torch.float64)
    mask = torch.zeros(10, 10, dtype=torch.bool)
    assert torch.equal(poisson_blend(target, source, mask), target)
    mask[0:4, 0:5] = True  # touches the border: the border row/column stays the target (Dirichlet)
    out = poisson_blend(target, source, mask)
    assert torch.equal(out[0], target[0]) and torch.equal(out[:, 0], target[:, 0])
    assert not torch.equal(out, target)


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        poisson_blend(torch.zeros(4, 4), torch.zeros(4, 5), torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="spatial shape"):
        poisson_blend(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), torch.zeros(5, 4, dtype=torch.bool))


def test_dst1_is_orthonormal_and_self_inverse():
    x = torch.rand(2, 5, 7, 6, dtype=torch.float64)  # channels first
    y = dst1(x)
    assert torch.allclose(dst1(y), x, atol=1e-12)
    assert torch.allclose(y.norm(), x.norm())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(4)
    target, source = torch.rand(2, 24, 24, 24, generator=gen)
    mask = torch.zeros(24, 24, 24, dtype=torch.bool)
    mask[5:15, 6:18, 4:20] = True
    cpu = poisson_blend(target, source, mask, True)
    gpu = poisson_blend(target.cuda(), source.cuda(), mask.cuda(), True)
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)
