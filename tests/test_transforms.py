"""RandSyntheticAnomalyd: MONAI conventions (Randomizable, set_random_state, numpy/torch/MetaTensor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd
from parameterized import parameterized

from conftest import textured_scan
from scripts.transforms import RandSyntheticAnomalyd

IMAGE, FOREGROUND = textured_scan((20, 18, 16), seed=0)
PARTNER, _ = textured_scan((20, 18, 16), seed=1)
FOREIGN = torch.rand(1, 25, 21, 19, generator=torch.Generator().manual_seed(3))


def sample(kind: str) -> dict:
    convert = {
        "numpy": lambda x: x.numpy(),
        "torch": lambda x: x.clone(),
        "metatensor": lambda x: MetaTensor(x.clone(), affine=torch.diag(torch.tensor([2.0, 1.5, 3.0, 1.0])),
                                           meta={"filename_or_obj": "case_001.nii.gz"}),
    }[kind]
    return {"image": convert(IMAGE), "partner": convert(PARTNER), "foreground": FOREGROUND.numpy(),
            "foreign": convert(FOREIGN)}


@parameterized.expand([("numpy", np.ndarray), ("torch", torch.Tensor), ("metatensor", MetaTensor)])
def test_input_types_give_the_same_anomaly_and_keep_their_type(kind, expected_type):
    transform = RandSyntheticAnomalyd(foreign_key="foreign")
    transform.set_random_state(7)
    out = transform(sample(kind))
    reference = RandSyntheticAnomalyd(foreign_key="foreign").set_random_state(7)(sample("torch"))
    assert isinstance(out["image"], expected_type) and isinstance(out["label"], expected_type)
    np.testing.assert_array_equal(np.asarray(out["image"]), reference["image"].numpy())
    np.testing.assert_array_equal(np.asarray(out["label"]), reference["label"].numpy())
    assert out["label"].shape == (1, 20, 18, 16)
    assert out["anomaly_task"] == reference["anomaly_task"] != "none"
    assert not np.array_equal(np.asarray(out["image"]), IMAGE.numpy())


def test_metatensor_metadata_is_kept_on_image_and_label():
    out = RandSyntheticAnomalyd().set_random_state(1)(sample("metatensor"))
    for key in ("image", "label"):
        assert out[key].meta["filename_or_obj"] == "case_001.nii.gz"
        assert torch.equal(out[key].affine, torch.diag(torch.tensor([2.0, 1.5, 3.0, 1.0], dtype=torch.float64)))


def test_set_random_state_reproduces_bit_for_bit_and_seeds_differ():
    transform = RandSyntheticAnomalyd(foreign_key="foreign")
    runs = []
    for seed in (5, 5, 6):
        transform.set_random_state(seed)
        runs.append(transform(sample("torch")))
    assert torch.equal(runs[0]["image"], runs[1]["image"]) and torch.equal(runs[0]["label"], runs[1]["label"])
    assert not torch.equal(runs[0]["image"], runs[2]["image"])
    # successive calls draw new anomalies
    transform.set_random_state(5)
    first, second = transform(sample("torch")), transform(sample("torch"))
    assert not torch.equal(first["image"], second["image"])


def test_poisson_inter_only_with_a_foreign_key_and_partner_tasks_only_with_a_partner():
    without_foreign = RandSyntheticAnomalyd().set_random_state(0)
    chosen = {without_foreign(sample("torch"))["anomaly_task"] for _ in range(40)}
    assert "poisson_inter" not in chosen and {"fpi", "sink"} <= chosen
    with_foreign = RandSyntheticAnomalyd(foreign_key="foreign", tasks=["poisson_inter"]).set_random_state(0)
    out = with_foreign(sample("torch"))
    assert out["anomaly_task"] == "poisson_inter" and out["label"].max() > 0
    no_partner = {k: v for k, v in sample("torch").items() if k != "partner"}
    transform = RandSyntheticAnomalyd().set_random_state(0)
    chosen = {transform(dict(no_partner))["anomaly_task"] for _ in range(30)}
    assert chosen.isdisjoint({"fpi", "poisson_intra"})


def test_prob_zero_leaves_the_image_and_writes_an_empty_label():
    out = RandSyntheticAnomalyd(prob=0.0).set_random_state(0)(sample("torch"))
    assert torch.equal(out["image"], IMAGE) and not out["label"].any() and out["anomaly_task"] == "none"
    transform = RandSyntheticAnomalyd(prob=0.5).set_random_state(0)
    tasks = [transform(sample("torch"))["anomaly_task"] for _ in range(60)]
    assert 15 < tasks.count("none") < 45


def test_works_inside_compose_on_channel_last_numpy_input():
    pipeline = Compose([
        EnsureChannelFirstd(keys=["image", "partner"], channel_dim="no_channel"),
        RandSyntheticAnomalyd(tasks=["sink", "smooth_intensity"], label_key="target"),
    ])
    pipeline.set_random_state(3)
    data = {"image": IMAGE[0].numpy(), "partner": PARTNER[0].numpy()}
    out = pipeline(data)
    assert out["target"].shape == (1, 20, 18, 16) and out["anomaly_task"] in ("sink", "smooth_intensity")
    pipeline.set_random_state(3)
    again = pipeline({"image": IMAGE[0].numpy(), "partner": PARTNER[0].numpy()})
    assert torch.equal(torch.as_tensor(out["image"]), torch.as_tensor(again["image"]))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown or no tasks"):
        RandSyntheticAnomalyd(tasks=["cutpaste"])
    with pytest.raises(ValueError, match="no task left"):
        RandSyntheticAnomalyd(tasks=["poisson_inter"])
    with pytest.raises(ValueError, match="one image key"):
        RandSyntheticAnomalyd(keys=["t1", "t2"])
    bad = dict(sample("torch"), foreground=np.ones((5, 5, 5), dtype=bool))
    with pytest.raises(ValueError, match="foreground shape"):
        RandSyntheticAnomalyd(tasks=["sink"]).set_random_state(0)(bad)
