"""Average precision from counts and the Ignite metrics, against sklearn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from scripts.scores import sample_score
from scripts.training.metrics import PixelAveragePrecision, SampleAveragePrecision, average_precision_from_counts


@pytest.mark.parametrize("seed", range(5))
def test_ap_from_counts_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    bins = 50
    scores = rng.integers(0, bins, size=4000)  # heavy ties
    labels = rng.random(4000) < 0.1 + 0.6 * scores / bins
    positives = np.bincount(scores[labels], minlength=bins)
    negatives = np.bincount(scores[~labels], minlength=bins)
    got = average_precision_from_counts(torch.tensor(positives), torch.tensor(negatives))
    assert abs(got - average_precision_score(labels, scores)) < 1e-9


def test_ap_from_counts_without_positives_is_zero():
    assert average_precision_from_counts(torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)) == 0.0


def test_pixel_ap_metric_matches_sklearn_on_quantised_scores():
    rng = np.random.default_rng(1)
    bins = 1 << 12
    metric = PixelAveragePrecision(bins=bins)
    metric.reset()
    preds, labels = [], []
    for _ in range(3):  # three "batches" of two volumes, as decollated lists
        pred = [torch.from_numpy(rng.random((1, 6, 7, 8), dtype=np.float32)) for _ in range(2)]
        label = [(p + 0.3 * torch.rand(p.shape) > 0.9).float() * 0.8 for p in pred]  # soft labels 0 / 0.8
        metric.update((pred, label))
        preds += pred
        labels += label
    scores = np.round(torch.cat([p.flatten() for p in preds]).numpy() * (bins - 1))
    truth = torch.cat([lab.flatten() for lab in labels]).numpy() >= 0.5
    assert abs(metric.compute() - average_precision_score(truth, scores)) < 1e-9


def test_sample_ap_and_score():
    flat = torch.zeros(1, 10, 10, 10)
    spot = flat.clone()
    spot[0, 2, 3, 4] = 0.9
    assert float(sample_score(spot, 1e-3)) == pytest.approx(0.9)
    assert float(sample_score(spot, 2e-3)) == pytest.approx(0.45)
    metric = SampleAveragePrecision(method=1e-3)
    metric.reset()
    labels = [torch.zeros_like(flat), (spot > 0).float(), torch.zeros_like(flat), (spot > 0).float()]
    preds = [flat + 0.1, spot, flat + 0.95, spot * 0.5]
    metric.update((preds, labels))
    expected = average_precision_score([0, 1, 0, 1], [0.1, 0.9, 0.95, 0.45])
    assert metric.compute() == pytest.approx(expected)


def test_a_diverged_networks_nan_map_counts_as_least_anomalous_instead_of_failing():
    # a NaN map (a network that diverged) ranks below every finite score; the metrics still compute
    label = torch.zeros(1, 4, 4, 4)
    label[0, 1, 1, 1] = 1.0
    good = label * 0.9 + 0.05
    nan = torch.full_like(label, float("nan"))
    pixel = PixelAveragePrecision(bins=1 << 8)
    pixel.reset()
    pixel.update(([good, nan], [label, label]))
    expected = average_precision_score(np.r_[label.flatten(), label.flatten()] >= 0.5,
                                       np.round(np.r_[good.flatten(), torch.zeros(64)] * 255))
    assert pixel.compute() == pytest.approx(expected) and 0 < expected < 1
    sample = SampleAveragePrecision(method=1e-2)
    sample.reset()
    sample.update(([good, nan, good * 0.1], [label, label, torch.zeros_like(label)]))
    assert sample.compute() == pytest.approx(average_precision_score([1, 1, 0], [0.95, 0.0, 0.095]))


def test_validation_loss_averages_per_sample():
    """train.yaml's val_loss is MONAI's IgniteMetricHandler(loss_fn=...) on the decollated validation outputs."""
    from ignite.engine import Engine
    from monai.handlers import IgniteMetricHandler

    engine = Engine(lambda engine, batch: batch)
    IgniteMetricHandler(loss_fn=torch.nn.functional.l1_loss).attach(engine, "val_loss")
    preds, labels = [torch.ones(1, 2, 2), torch.zeros(1, 2, 2)], [torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)]
    engine.run([(preds, labels)])
    assert engine.state.metrics["val_loss"] == pytest.approx(0.5)
