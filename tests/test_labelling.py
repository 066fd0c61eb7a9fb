"""The flipped-Gaussian labeller and the per-region closing and hole filling."""

from __future__ import annotations

import math

import torch

from scripts.anomalies import fill_holes, flipped_gaussian, grey_close, label_region


def test_flipped_gaussian_zero_monotone_and_saturating():
    x = torch.linspace(0, 3, 301, dtype=torch.float64)
    y = flipped_gaussian(x, sigma=0.2)
    assert y[0] == 0
    assert torch.all(torch.diff(y) >= 0)
    assert torch.all(torch.diff(y[:100]) > 0)
    assert y[-1] > 1 - 1e-12
    assert torch.equal(flipped_gaussian(-x, 0.2), y)
    # the defining value: y(sigma) = 1 - exp(-1/2), and smooth at 0 (slope 0, unlike NSA's logistic)
    at_sigma = flipped_gaussian(torch.tensor(0.2, dtype=torch.float64), 0.2)
    assert abs(float(at_sigma) - (1 - math.exp(-0.5))) < 1e-12
    assert flipped_gaussian(torch.tensor(1e-4, dtype=torch.float64), 0.2) < 1e-6


def test_fill_holes_fills_enclosed_holes_only():
    x = torch.zeros(9, 9)
    x[2:7, 2:7] = 0.8
    x[4, 4] = 0.1  # enclosed hole
    x[2:7, 0:2] = 0.0
    x[3, 2] = 0.0  # a notch open to the outside through the zero border
    filled = fill_holes(x)
    assert filled[4, 4] == 0.8
    assert filled[3, 2] == 0.0
    assert torch.all(filled >= x)
    assert filled[0, 0] == 0.0


def test_fill_holes_3d_cavity():
    x = torch.zeros(10, 10, 10)
    x[2:8, 2:8, 2:8] = 1.0
    x[4:6, 4:6, 4:6] = 0.0
    assert fill_holes(x)[4:6, 4:6, 4:6].eq(1.0).all()


def test_grey_close_is_extensive_and_bridges_single_voxel_gaps():
    x = torch.zeros(7, 7)
    x[3, 1:6] = 1.0
    x[3, 3] = 0.0
    closed = grey_close(x)
    assert torch.all(closed >= x)
    assert closed[3, 3] == 1.0


def test_label_region_is_zero_outside_change_and_in_unit_range():
    change = torch.zeros(12, 12)
    mask = torch.zeros(12, 12, dtype=torch.bool)
    mask[3:9, 3:9] = True
    change[3:9, 3:9] = 2.0
    change[5, 5] = 0.0  # e.g. the centre of a sink: enclosed, so labelled like its surroundings
    change[0, 0] = 5.0  # outside the mask: ignored
    label = label_region(change, mask)
    assert label.min() >= 0 and label.max() <= 1
    assert label[0, 0] == 0
    assert label[5, 5] > 0.99
    assert label[mask].min() > 0.99
