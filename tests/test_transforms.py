"""The bundle's MONAI transforms: RandSyntheticAnomalyd (RandomizableTransform, set_random_state) and the
preprocessing array/dictionary pairs, against MONAI's conventions (missing keys, numpy/torch/MetaTensor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, MapTransform, RandomizableTransform, Transform
from monai.utils import TransformBackends
from parameterized import parameterized

import scripts.transforms as transforms_module
from conftest import textured_scan
from scripts.transforms import (
    FiniteIntensity,
    FiniteIntensityd,
    IntensityForeground,
    IntensityForegroundd,
    NormaliseIntensity,
    NormaliseIntensityd,
    RandSyntheticAnomalyd,
)

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


# ---- MONAI conventions of the preprocessing transforms --------------------------------------------------

FINGERPRINT = {"percentile_00_5": 10.0, "percentile_99_5": 150.0, "mean": 90.0, "std": 25.0}
AFFINE = torch.diag(torch.tensor([2.0, 1.5, 3.0, 1.0], dtype=torch.float64))


def broken_image() -> torch.Tensor:
    """IMAGE with a NaN, a +Inf and a -Inf voxel, so FiniteIntensity has something to repair."""
    image = IMAGE.clone()
    image[0, 10, 9, 8], image[0, 11, 9, 8], image[0, 12, 9, 8] = float("nan"), float("inf"), -float("inf")
    return image


def as_kind(x: torch.Tensor, kind: str):
    if kind == "numpy":
        return x.numpy().copy()
    if kind == "torch":
        return x.clone()
    return MetaTensor(x.clone(), affine=AFFINE.clone(), meta={"filename_or_obj": "case_001.nii.gz"})


KINDS = [("numpy", np.ndarray), ("torch", torch.Tensor), ("metatensor", MetaTensor)]

# (name, array transform, its call as a function of (transform, image, foreground), dictionary transform,
#  the key the dictionary transform writes, the input image)
PAIRS = {
    "finite": (lambda: FiniteIntensity(), lambda t, x, fg: t(x), lambda **kw: FiniteIntensityd(**kw), "image",
               broken_image),
    "foreground": (lambda: IntensityForeground(fraction=0.2), lambda t, x, fg: t(x),
                   lambda **kw: IntensityForegroundd(fraction=0.2, **kw), "foreground", lambda: IMAGE),
    "zscore": (lambda: NormaliseIntensity(), lambda t, x, fg: t(x, mask=fg),
               lambda **kw: NormaliseIntensityd(**kw), "image", lambda: IMAGE),
    "fingerprint": (lambda: NormaliseIntensity("fingerprint", FINGERPRINT), lambda t, x, fg: t(x),
                    lambda **kw: NormaliseIntensityd(mode="fingerprint", fingerprint=FINGERPRINT, **kw), "image",
                    lambda: IMAGE),
}
DICT_TRANSFORMS = [
    ("finite", lambda **kw: FiniteIntensityd(**kw)),
    ("foreground", lambda **kw: IntensityForegroundd(**kw)),
    ("zscore", lambda **kw: NormaliseIntensityd(**kw)),
    ("fingerprint", lambda **kw: NormaliseIntensityd(mode="fingerprint", fingerprint=FINGERPRINT, **kw)),
    ("anomaly", lambda **kw: RandSyntheticAnomalyd(foreign_key="foreign", **kw).set_random_state(0)),
]


def test_public_names_and_monai_base_classes():
    assert sorted(transforms_module.__all__) == sorted([
        "FiniteIntensity", "FiniteIntensityd", "IntensityForeground", "IntensityForegroundd",
        "NormaliseIntensity", "NormaliseIntensityd", "RadiographIntensity", "RadiographIntensityd",
        "RandSyntheticAnomalyd", "TimedCompose",
    ])
    assert all(hasattr(transforms_module, name) for name in transforms_module.__all__)
    assert not hasattr(transforms_module, "ForegroundMaskd")  # the name of an unrelated (Otsu) MONAI transform
    both = {TransformBackends.TORCH, TransformBackends.NUMPY}
    for array, dictionary in ((FiniteIntensity, FiniteIntensityd), (IntensityForeground, IntensityForegroundd),
                              (NormaliseIntensity, NormaliseIntensityd),
                              (transforms_module.RadiographIntensity, transforms_module.RadiographIntensityd)):
        assert issubclass(array, Transform) and not issubclass(array, MapTransform)
        assert issubclass(dictionary, MapTransform)
        assert set(array.backend) == both and dictionary.backend == array.backend
    assert issubclass(RandSyntheticAnomalyd, RandomizableTransform) and issubclass(RandSyntheticAnomalyd, MapTransform)
    assert TransformBackends.TORCH in RandSyntheticAnomalyd.backend


@parameterized.expand(DICT_TRANSFORMS)
def test_missing_key_is_skipped_with_allow_missing_keys_and_an_error_without(_, make):
    data = {"scan": IMAGE.clone(), "partner": PARTNER.clone(), "foreground": FOREGROUND.numpy()}
    out = make(keys="image", allow_missing_keys=True)(data)
    assert out.keys() == data.keys() and all(out[k] is data[k] for k in data)
    with pytest.raises(KeyError, match="image"):
        make(keys="image", allow_missing_keys=False)(data)


def test_anomaly_transform_with_a_missing_image_does_not_draw():
    transform = RandSyntheticAnomalyd(allow_missing_keys=True).set_random_state(4)
    transform({"partner": PARTNER.clone()})
    after_skip = transform({"image": IMAGE.clone(), "partner": PARTNER.clone()})
    fresh = RandSyntheticAnomalyd().set_random_state(4)({"image": IMAGE.clone(), "partner": PARTNER.clone()})
    assert after_skip["anomaly_task"] == fresh["anomaly_task"] and torch.equal(after_skip["image"], fresh["image"])


@parameterized.expand([(name, kind, cls) for name in PAIRS for kind, cls in KINDS])
def test_array_transforms_keep_the_input_type_and_give_the_same_values(name, kind, expected_type):
    make, call, _, _, image = PAIRS[name]
    reference = call(make(), image(), FOREGROUND)
    assert isinstance(reference, torch.Tensor)
    out = call(make(), as_kind(image(), kind), as_kind(FOREGROUND, kind))
    assert isinstance(out, expected_type)
    if kind == "torch":
        assert not isinstance(out, MetaTensor)
    np.testing.assert_array_equal(np.asarray(out), reference.numpy())
    assert torch.as_tensor(np.asarray(out)).dtype == reference.dtype
    assert reference.dtype == (torch.bool if name == "foreground" else torch.float32)
    if kind == "metatensor":
        assert out.meta["filename_or_obj"] == "case_001.nii.gz" and torch.equal(out.affine, AFFINE)


@parameterized.expand([(name, kind) for name in PAIRS for kind, _ in KINDS])
def test_dictionary_transforms_equal_their_array_transform(name, kind):
    make, call, make_dict, out_key, image = PAIRS[name]
    data = {"image": as_kind(image(), kind), "foreground": as_kind(FOREGROUND[None], kind)}
    given = dict(data)
    expected = call(make(), as_kind(image(), kind), data["foreground"])
    out = make_dict(keys="image")(data)
    assert type(out[out_key]) is type(expected)
    np.testing.assert_array_equal(np.asarray(out[out_key]), np.asarray(expected))
    assert set(out) == {"image", "foreground"} and all(data[k] is given[k] for k in given)  # input dict untouched


def test_finite_intensity_repairs_nan_and_inf_from_the_finite_range():
    image = broken_image()
    finite = image[torch.isfinite(image)]
    out = FiniteIntensity()(image)
    assert torch.isfinite(out).all()
    assert out[0, 10, 9, 8] == finite.min() and out[0, 11, 9, 8] == finite.max() and out[0, 12, 9, 8] == finite.min()
    mask = torch.isfinite(image)
    assert torch.equal(out[mask], image[mask])
    assert not FiniteIntensity()(torch.full((1, 3, 3), float("nan"))).any()
    clean = torch.arange(8, dtype=torch.float32).reshape(1, 2, 4)
    assert FiniteIntensity()(clean) is clean  # a clean float32 image is returned untouched
    integers = np.arange(8, dtype=np.int16).reshape(1, 2, 4)
    out = FiniteIntensity()(integers)  # any other type is cast to float32 after the checks
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and np.array_equal(out, integers)


def test_finite_intensity_repairs_before_the_float32_cast_at_any_scale(caplog):
    image = IMAGE.double()
    for scale in (1e300, 1e-300, 1e-320):  # a float64 scan in an absurd unit (the last subnormal): Inf or zeros
        scan = MetaTensor(image * scale, meta={"filename_or_obj": "odd_unit.nii"})
        with caplog.at_level("WARNING", logger="scripts.transforms"):
            out = FiniteIntensity()(scan)
        assert out.dtype == torch.float32 and torch.isfinite(out).all() and out.std() > 0
        exponent = torch.log2(out.double()[image != 0] / scan.as_tensor()[image != 0])
        assert torch.allclose(exponent, exponent.round(), atol=1e-6)  # a power of two: a z-score is unchanged
        assert exponent.round().unique().numel() == 1
        assert "odd_unit.nii: intensities repaired: rescaled by 2^" in caplog.text
        caplog.clear()
    outliers = image.clone()
    outliers[0, 3, 3, 3], outliers[0, 4, 4, 4] = 1e300, -1e300  # a few absurd voxels in a normal scan
    out = FiniteIntensity()(outliers)
    keep = outliers.abs() < 1e300
    assert torch.equal(out[keep], image[keep].float())  # the rest is not rescaled away
    assert out[0, 3, 3, 3] == image[keep].max().float() and out[0, 4, 4, 4] == image[keep].min().float()


def test_intensity_foreground_thresholds_between_the_minimum_and_the_99th_percentile():
    image = torch.zeros(1, 10, 10)
    image[0, 2:8, 2:8] = 100.0
    image[0, 4, 4] = 5.0  # below min + 0.1 * (p99 - min) = 10
    mask = IntensityForeground(fraction=0.1)(image)
    expected = image[0] > 10.0
    assert mask.shape == (1, 10, 10) and mask.dtype == torch.bool and torch.equal(mask[0], expected)
    two_channels = torch.cat([torch.zeros(1, 10, 10), image])  # a voxel bright in any channel is foreground
    assert torch.equal(IntensityForeground(fraction=0.1)(two_channels), mask)
    assert IntensityForeground()(torch.zeros(1, 4, 4)).all()  # nothing above the threshold: all true
    with pytest.raises(ValueError, match="one image key"):
        IntensityForegroundd(keys=["t1", "t2"])


def test_zscore_uses_the_foreground_of_the_same_dict():
    out = NormaliseIntensityd()({"image": IMAGE.clone(), "foreground": FOREGROUND.numpy()})["image"]
    inside = out[0][FOREGROUND]
    assert abs(float(inside.mean())) < 1e-5 and abs(float(inside.std()) - 1.0) < 1e-4
    whole = NormaliseIntensityd(foreground_key=None)({"image": IMAGE.clone(), "foreground": FOREGROUND})["image"]
    assert abs(float(whole.mean())) < 1e-5 and not torch.allclose(whole, out)
    assert torch.equal(whole, NormaliseIntensity()(IMAGE.clone()))
    with pytest.raises(ValueError, match="mode must be"):
        NormaliseIntensity(mode="minmax")


def test_dictionary_transforms_process_every_key():
    data = {"image": broken_image(), "partner": broken_image()}
    out = FiniteIntensityd(keys=["image", "partner"])(data)
    assert torch.isfinite(out["image"]).all() and torch.isfinite(out["partner"]).all()
    out = NormaliseIntensityd(keys=["image", "partner"], foreground_key=None)({"image": IMAGE, "partner": PARTNER})
    assert torch.equal(out["image"], NormaliseIntensity()(IMAGE))
    assert torch.equal(out["partner"], NormaliseIntensity()(PARTNER))


def test_anomaly_transform_draws_prob_the_monai_way():
    transform = RandSyntheticAnomalyd(prob=0.5).set_random_state(2)
    assert transform.prob == 0.5
    for _ in range(20):
        out = transform(sample("torch"))
        assert (out["anomaly_task"] != "none") == transform._do_transform
    with pytest.raises(ValueError, match="prob"):
        RandSyntheticAnomalyd(prob=1.5)


def test_robust_normalisation_clips_to_the_scans_percentiles_and_ignores_the_unit():
    image = IMAGE.clone()
    image[0, 3, 3, 3] = 1e4  # a metal-like outlier inside the foreground
    fg = FOREGROUND.clone()
    fg[3, 3, 3] = True
    out = NormaliseIntensity("robust")(image, mask=fg)
    for rescaled in (image * 3 + 100, (image + 1024) / 4095):
        np.testing.assert_allclose(NormaliseIntensity("robust")(rescaled, mask=fg), out, atol=1e-4)
    inside = out[0][fg]
    assert abs(float(inside.mean())) < 0.05 and abs(float(inside.std()) - 1) < 0.05  # the clipped foreground
    assert float(out[0, 3, 3, 3]) < 5  # clipped to the 99.5th percentile: the outlier does not dominate
    with pytest.raises(ValueError, match="mode must be one of"):
        NormaliseIntensity("minmax")


def test_robust_normalisation_of_a_large_grid_samples_its_percentiles():
    image = torch.linspace(0, 1, 1 << 25).reshape(1, 512, 256, 256)  # beyond torch.quantile's 2^24 values
    out = NormaliseIntensity("robust")(image, mask=torch.ones(512, 256, 256, dtype=torch.bool))
    clipped = image.clamp(0.005, 0.995)
    expected = (clipped - clipped.mean()) / clipped.std()
    assert torch.allclose(out, expected, atol=1e-3)


def test_timed_compose_applies_like_compose_and_sums_seconds_by_stage():
    from monai.transforms import Compose, Lambdad

    from scripts.transforms import TimedCompose

    class Load(Lambdad):
        pass

    steps = [Load(keys="x", func=lambda v: v + 1), Compose([Lambdad(keys="x", func=lambda v: v * 3),
                                                           Lambdad(keys="x", func=lambda v: v - 2)])]
    timed = TimedCompose(steps, stages={"Load": "load"}, default_stage="preprocess")
    out = timed({"x": torch.tensor(2.0), "timings": {"load": 1.0}})
    assert out["x"] == Compose(steps)({"x": torch.tensor(2.0)})["x"] == 7
    assert set(out["timings"]) == {"load", "preprocess"} and out["timings"]["load"] >= 1.0  # added to what was there
    assert 0 <= out["timings"]["preprocess"] < 1
    assert timed({"x": torch.tensor(0.0)}, start=1)["x"] == -2  # start and end count the flattened transforms
