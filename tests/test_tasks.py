"""Every synthetic task, in 2D and 3D: labels, where they sit, foreground, determinism, dtype, scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from scripts.anomalies import TASKS, default_foreground, intensity_scale, synthesize

ALL_TASKS = sorted(TASKS)
SEEDS = range(4)


def run(scans, task, seed, **kwargs):
    return synthesize(
        scans["image"], torch.Generator().manual_seed(seed), task, scans["foreground"],
        partner=scans["partner"], foreign=scans["foreign"], **kwargs,
    )


@pytest.mark.parametrize("task", ALL_TASKS)
def test_labels_in_unit_range_and_on_the_changes(scans, task):
    image = scans["image"]
    scale = intensity_scale(image, scans["foreground"])
    for seed in SEEDS:
        out, label, info = run(scans, task, seed)
        assert out.shape == image.shape and label.shape == (1, *image.shape[1:])
        assert 1 <= len(info["anomalies"]) <= 4 and info["task"] == task
        assert label.min() >= 0 and label.max() <= 1
        change = ((out - image).abs().mean(0) / scale).numpy()
        assert change.max() > 0.05, "the task changed nothing"
        lab = label[0].numpy()
        # voxels that changed noticeably carry a label (0.5 std -> flipped Gaussian 0.956)
        assert (lab[change > 0.5] > 0.9).all()
        # labels >= 0.5 sit where something changed: within two voxels of a change of at least the labeller's
        # half-height (0.235 sigma-units), or inside a region such changes enclose
        changed = change >= 0.23
        near = ndimage.binary_dilation(changed, structure=np.ones((3,) * changed.ndim), iterations=2)
        assert not (lab >= 0.5)[~ndimage.binary_fill_holes(near)].any()


@pytest.mark.parametrize("task", ALL_TASKS)
def test_anomalies_centred_in_the_foreground_and_image_untouched_elsewhere(scans, task):
    image, foreground = scans["image"], scans["foreground"]
    for seed in SEEDS:
        out, label, info = run(scans, task, seed)
        touched = torch.zeros_like(foreground)
        for anomaly in info["anomalies"]:
            assert foreground[tuple(anomaly["centre"])]
            # every task writes inside the anomaly's box grown by one voxel (the blend's boundary layer)
            touched[tuple(slice(max(a - 1, 0), b + 1) for a, b in anomaly["box"])] = True
        assert torch.equal(out[:, ~touched], image[:, ~touched])
        assert not label[0][~touched].any()


@pytest.mark.parametrize("task", ALL_TASKS)
def test_same_seed_same_output_other_seed_other_output(scans, task):
    first = run(scans, task, seed=11)
    again = run(scans, task, seed=11)
    other = run(scans, task, seed=12)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("task", ALL_TASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_kept(scans, task, dtype):
    cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in scans.items()}
    out, label, _ = run(cast, task, seed=0)
    assert out.dtype == dtype and label.dtype == dtype
    assert out.device == cast["image"].device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("task", ALL_TASKS)
def test_cuda_gives_the_cpu_result(scans, task):
    cpu = run(scans, task, seed=3)
    gpu = run({k: v.cuda() for k, v in scans.items()}, task, seed=3)
    assert gpu[0].device.type == "cuda"
    assert torch.allclose(gpu[0].cpu(), cpu[0], atol=1e-3) and torch.allclose(gpu[1].cpu(), cpu[1], atol=1e-2)


@pytest.mark.parametrize("task", ["fpi", "poisson_intra", "sink", "source", "smooth_intensity"])
def test_affine_rescaling_of_the_input_gives_the_same_anomalies(scans, task):
    # the engine normalises internally: HU or [0, 1] or z-scores, the anomaly and its label are the same
    a, b = 0.02, -3.0
    base = {k: (v.double() if v.is_floating_point() else v) for k, v in scans.items()}
    scaled = dict(base, image=base["image"] * a + b, partner=base["partner"] * a + b)
    out, label, _ = run(base, task, seed=5)
    out_s, label_s, _ = run(scaled, task, seed=5)
    assert torch.allclose(out_s, out * a + b, atol=1e-9)
    assert torch.allclose(label_s, label, atol=1e-9)


def test_fpi_interpolation_label(scans):
    image, partner = scans["image"], scans["partner"]
    for seed in SEEDS:
        out, label, info = run(scans, "fpi", seed, interpolation_label=True)
        values = torch.unique(label)
        assert values[0] == 0 and ((values[1:] >= 0.05) & (values[1:] <= 0.95)).all()
        # inside a single anomaly: out = (1 - a) x + a x'  with a the label
        if len(info["anomalies"]) == 1:
            a = values[-1]
            inside = label[0] > 0
            assert torch.allclose(out[:, inside], (1 - a) * image[:, inside] + a * partner[:, inside], atol=1e-4)
            assert not (partner - image)[:, inside].eq(0).any()


def test_missing_partner_or_foreign_is_a_clear_error(scans):
    gen = torch.Generator()
    with pytest.raises(ValueError, match="needs a partner"):
        synthesize(scans["image"], gen, "fpi", scans["foreground"])
    with pytest.raises(ValueError, match="needs a foreign"):
        synthesize(scans["image"], gen, "poisson_inter", scans["foreground"])
    with pytest.raises(ValueError, match="unknown task"):
        synthesize(scans["image"], gen, "cutpaste", scans["foreground"])


def test_number_of_anomalies_is_one_to_four_with_fair_coin():
    image = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(0)) + 1
    counts = np.zeros(5, dtype=int)
    for seed in range(400):
        _, _, info = synthesize(image, torch.Generator().manual_seed(seed), "smooth_intensity")
        counts[len(info["anomalies"])] += 1
    assert counts[0] == 0
    freq = counts[1:] / counts.sum()
    # 1: 1/2, 2: 1/4, 3: 1/8, 4: 1/8
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.125, 0.125], atol=0.06)


@pytest.mark.parametrize("task", ["sink", "source"])
def test_sink_pulls_and_source_pushes_intensities_along_the_rays(task):
    # On a linear ramp, linear resampling is exact: out(p) = ramp(p~) with p~ on the ray from the deformation
    # centre c through p. Sink samples further out (|ramp(p~) - ramp(c)| >= |ramp(p) - ramp(c)|, same side),
    # source closer in; p~ never leaves the mask, so the result stays within the mask's original values.
    n = 48
    axes = [torch.arange(n, dtype=torch.float64)] * 2
    yy, xx = torch.meshgrid(*axes, indexing="ij")
    image = (2.0 * yy + 3.0 * xx + 10.0)[None]
    for seed in range(6):
        out, label, info = synthesize(image, torch.Generator().manual_seed(seed), task, max_anomalies=1)
        anomaly = info["anomalies"][0]
        centre_value = image[(0, *anomaly["deformation_centre"])]
        before, after = image[0] - centre_value, out[0] - centre_value
        moved = (after - before).abs() > 1e-9
        assert moved.any()
        assert (torch.sign(after[moved]) == torch.sign(before[moved])).all()
        if task == "sink":
            assert (after[moved].abs() > before[moved].abs()).all()
        else:
            assert (after[moved].abs() < before[moved].abs()).all()
        assert (label[0][moved] > 0).all()


def test_default_foreground_and_scale():
    image = torch.zeros(1, 10, 10)
    image[0, 2:5, 2:5] = torch.arange(9, dtype=torch.float32).reshape(3, 3) + 1
    fg = default_foreground(image)
    assert fg.sum() == 9
    assert abs(intensity_scale(image, fg) - float(image[0, 2:5, 2:5].std())) < 1e-5
    assert default_foreground(torch.ones(1, 4, 4)).all()  # constant image: everything
    assert intensity_scale(torch.ones(1, 4, 4)) == 1.0
