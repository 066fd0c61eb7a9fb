"""The slice-wise FPI system: a 2D network trained on slices of the working grid and run slice by slice on volumes
(scripts.networks.SliceWiseNetwork), its plan, its training slices, FPI's sample score, and training plus inference
through the bundle CLI on tiny volumes, whose maps come back on the input grid exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.networks.nets import DynUNet

from scripts.data.datasets import SyntheticAnomalyDataset
from scripts.inference.operating_points import operating_point
from scripts.networks import EMPTY_SLICE_LOGIT, SliceWiseNetwork, build_network, slices_with_foreground
from scripts.plans import default_plan, make_plan, sample_score_method
from scripts.scores import fpi_slice_score, sample_score

ROOT = Path(__file__).resolve().parents[1]
TINY_2D = ["--spatial_size", "[32,32,32]", "--network_depth", "3", "--network_base_filters", "4", "--num_workers", "0",
           "--max_val_samples", "6", "--slices_per_scan", "4", "--batch_size", "8"]


def tiny_2d() -> DynUNet:
    return DynUNet(2, 1, 1, kernel_size=[[3, 3]] * 3, strides=[[1, 1], [2, 2], [2, 2]],
                   upsample_kernel_size=[[2, 2]] * 2, filters=[4, 8, 16], norm_name="instance")


def head(shape=(16, 20, 24), empty=((0, 3), (21, 24))) -> torch.Tensor:
    """(1, 1, *shape): textured content on a zero background, with the slices ``empty`` of axis 2 left empty."""
    gen = torch.Generator().manual_seed(0)
    volume = torch.rand((1, 1, *shape), generator=gen) + 1.0
    for start, stop in empty:
        volume[..., start:stop] = 0.0
    return volume


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_each_slice_is_the_2d_network_on_that_slice_and_empty_slices_are_zero(axis):
    torch.manual_seed(0)
    network = tiny_2d().eval()
    volume = head().movedim(4, 2 + axis)  # the empty slices along ``axis``
    wrapped = SliceWiseNetwork(network, axis, foreground_fraction=0.1, slice_batch=3).eval()
    with torch.no_grad():
        out = wrapped(volume)
        assert out.shape == volume.shape
        keep = slices_with_foreground(volume[0], axis, 0.1)
        assert keep.tolist() == [False] * 3 + [True] * 18 + [False] * 3
        for index in range(volume.shape[2 + axis]):
            got = out.select(2 + axis, index)
            if keep[index]:
                torch.testing.assert_close(got, network(volume.select(2 + axis, index)), rtol=1e-5, atol=1e-5)
            else:
                assert torch.all(got == EMPTY_SLICE_LOGIT) and torch.all(torch.sigmoid(got) == 0.0)
        assert torch.equal(wrapped(volume[..., 0] if axis != 2 else volume[..., 5]), network(
            volume[..., 0] if axis != 2 else volume[..., 5]))  # slices (B, C, H, W) go to the network as they are


def test_a_metatensor_volume_keeps_its_metadata_through_the_slices():
    affine = torch.tensor([[0, 2.0, 0, 10], [-1.5, 0, 0, 5], [0, 0, 3, -7], [0, 0, 0, 1]], dtype=torch.float64)
    volume = MetaTensor(head(), affine=affine, meta={"filename_or_obj": "x.nii.gz"})
    with torch.no_grad():
        out = SliceWiseNetwork(tiny_2d().eval(), 2).eval()(volume)
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, affine)
    assert out.meta["filename_or_obj"] == "x.nii.gz"


def test_fpi_sample_score_by_hand():
    # 10 slices along axis 2 with means 0..9 (every voxel of slice k is k): no smoothing window fits below
    # polyorder + 2 = 4 slices of 10 % (1 slice), so the window is 5; Savitzky-Golay of order 2 keeps a quadratic,
    # so the means stay 0..9, and the top 25 % (round(2.5) = 2 slices) are 9 and 8
    ramp = torch.arange(10.0).expand(3, 4, 10).contiguous()
    assert float(fpi_slice_score(ramp, slice_axis=2)) == pytest.approx(8.5, abs=1e-5)
    # a spike: one slice of 1.0 among zeros; by hand, the window-5 quadratic Savitzky-Golay weights are
    # (-3, 12, 17, 12, -3) / 35, so the smoothed spike is 17/35 with 12/35 beside it: top 2 slices (17 + 12) / 70
    spike = torch.zeros(2, 2, 10)
    spike[:, :, 5] = 1.0
    assert float(fpi_slice_score(spike[None], slice_axis=2)) == pytest.approx(29 / 70, abs=1e-5)
    # along another axis, and through sample_score with the plan's record
    method = sample_score_method("fpi_top_slices", slice_axis=0)
    assert float(sample_score(spike.movedim(2, 0), method)) == pytest.approx(29 / 70, abs=1e-5)
    assert float(sample_score(spike, 0.05)) == pytest.approx(1.0)  # the default: mean of the top 5 % of voxels
    with pytest.raises(ValueError, match="aggregation"):
        sample_score_method("top_slice")


def test_the_plan_of_a_slice_wise_model():
    plan = default_plan("brain", slice_axis=2, spatial_size=[32, 32, 48], network_depth=3, network_base_filters=4,
                        sample_score_aggregation="fpi_top_slices")
    assert plan["slice_axis"] == 2 and plan["network"]["args"]["spatial_dims"] == 2
    assert plan["sample_score"]["aggregation"] == "fpi_top_slices" and plan["sample_score"]["slice_axis"] == 2
    network = build_network(plan)
    assert isinstance(network, SliceWiseNetwork) and network.slice_axis == 2 and network.slice_batch == 16
    assert build_network(plan, slice_batch=40).slice_batch == 40  # common.yaml's slice_batch, a speed setting
    assert isinstance(build_network(plan["network"]), DynUNet)  # the definition alone is the 2D network
    spec = plan["network"]
    with pytest.raises(ValueError, match="set slice_axis"):
        make_plan("brain", spec, [32, 32, 32], "zscore")
    with pytest.raises(ValueError, match="multiple of the network's downsampling"):
        make_plan("brain", spec, [30, 32, 32], "zscore", slice_axis=2)
    with pytest.raises(ValueError, match="patch_size must be null"):
        make_plan("brain", spec, [32, 32, 32], "zscore", patch_size=[16, 16, 16], slice_axis=2)
    three_d = default_plan("brain", spatial_size=[32, 32, 32])
    assert three_d["slice_axis"] is None and not isinstance(build_network(three_d), SliceWiseNetwork)


def test_training_slices_hold_foreground_and_their_anomalies():
    volume = head((32, 32, 40), empty=((0, 10), (30, 40)))[0]
    scans = [{"image": volume * (1 + 0.1 * i), "foreground": volume > 0} for i in range(3)]
    dataset = SyntheticAnomalyDataset(scans, ["fpi", "sink"], slice_axis=2, slices_per_scan=5, max_anomalies=1)
    dataset.set_random_state(0)
    assert len(dataset) == 15
    seen = set()
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["image"].shape == (1, 32, 32) and item["label"].shape == (1, 32, 32)
        assert bool((item["image"] > 0).any())  # never one of the empty slices
        seen.add(item["anomaly_task"])
    assert seen == {"fpi", "sink"}
    again = SyntheticAnomalyDataset(scans, ["fpi", "sink"], slice_axis=2, slices_per_scan=5, max_anomalies=1)
    again.set_random_state(0)
    dataset.set_random_state(0)
    assert torch.equal(dataset[3]["image"], again[3]["image"])
    with pytest.raises(ValueError, match="slice_axis"):
        SyntheticAnomalyDataset(scans, ["fpi"], slice_axis=2, fixed=True)


def test_another_sample_aggregation_than_the_plans_flags_nothing(tmp_path, caplog):
    from conftest import write_models
    from scripts.inference.operating_points import fold_digests
    from scripts.io.files import save_json
    from scripts.plans import load_plan

    models = write_models(tmp_path / "models", "brain", (0,), spatial_size=[32, 32, 32], network_depth=3)
    plan = load_plan(models, "brain")
    plan["operating_points"] = {"folds": fold_digests(models, "brain"),
                                "sample": {"normal_scores": [0.1, 0.2, 0.3]}, "voxel": {"thresholds": {"0.001": 0.5}}}
    save_json(plan, models / "brain" / "plans.json")
    plan = load_plan(models, "brain")
    assert operating_point(plan, models, "brain", 0.05, 0.001, sample_score_method=plan["sample_score"])[
        "sample_threshold"] == pytest.approx(0.3)
    fpi = sample_score_method("fpi_top_slices", 0.01, None)
    point = operating_point(plan, models, "brain", 0.05, 0.001, sample_score_method=fpi)
    assert point["sample_threshold"] is None and "sample score aggregation" in caplog.text


def run_bundle(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bundle"))
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_slice_wise_training_and_inference_through_the_cli(normal_scans, tmp_path):
    """Every fold of a slice-wise brain model through ``scripts.training`` with the slicewise overlay, then
    inference without any overlay (the plan says slice-wise): the maps on the input grid, exactly, with the
    empty slices 0, and the FPI sample score as an inference option."""
    run = tmp_path / "run"
    configs = [str(ROOT / "bundle/configs" / n) for n in ("common.yaml", "train.yaml", "brain.yaml", "slicewise.yaml")]
    run_bundle("-m", "scripts.training", "--config_file", *configs, "--output_dir", str(run),
               "--dataset_dir", str(normal_scans["brain"]), "--cache_dir", str(tmp_path / "cache"),
               "--max_epochs", "1", *TINY_2D)
    models = run / "models"
    plan = json.loads((models / "brain" / "plans.json").read_text())
    assert plan["slice_axis"] == 2 and plan["network"]["args"]["spatial_dims"] == 2
    assert plan["operating_points"]["sample"]["thresholds"]
    state = torch.load(models / "brain" / "fold_0.pt", weights_only=True)
    SliceWiseNetwork(tiny_2d(), 2).load_state_dict(state)  # a plain state dict of the 2D network in its wrapper
    records = json.loads((run / "metrics.json").read_text())
    assert records and all(0 <= r["pixel_ap"] <= 1 for r in records)

    # inputs of another grid than the working grid, with an oblique affine and empty end slices
    inputs = tmp_path / "in"
    inputs.mkdir()
    source = sorted(Path(normal_scans["brain"]).glob("*.nii.gz"))[0]
    image = nib.load(source)
    data = np.asarray(image.dataobj, dtype=np.float32)[:, :30, :]
    data[..., :4] = 0
    affine = image.affine @ np.array([[1, 0.1, 0, 2], [0, 1, 0, -3], [0, 0, 1.2, 1], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), inputs / "case.nii.gz")
    out = tmp_path / "out"
    run_bundle("-m", "monai.bundle", "run", "--meta_file", "bundle/configs/metadata.json", "--bundle_root", "bundle",
               "--config_file", repr([str(ROOT / "bundle/configs" / n) for n in
                                      ("common.yaml", "inference.yaml", "brain.yaml")]),
               "--dataset_dir", str(inputs), "--output_dir", str(out), "--mode", "both", "--models_dir", str(models))
    written = nib.load(out / "case.nii.gz")
    assert written.shape == data.shape and np.allclose(written.affine, affine, atol=1e-5)
    pixel = np.asarray(written.dataobj)
    assert 0 <= pixel.min() and pixel.max() <= 1
    assert np.all(pixel[..., :3] == 0)  # the empty slices (resampled to the 32-slice grid, the first ones)
    ours = float((out / "case.nii.gz.txt").read_text())
    fpi_out = tmp_path / "fpi"
    result = run_bundle("-m", "monai.bundle", "run", "--meta_file", "bundle/configs/metadata.json", "--bundle_root",
                        "bundle", "--config_file", repr([str(ROOT / "bundle/configs" / n) for n in
                                                         ("common.yaml", "inference.yaml", "brain.yaml")]),
                        "--dataset_dir", str(inputs), "--output_dir", str(fpi_out), "--mode", "sample",
                        "--models_dir", str(models), "--sample_score_aggregation", "fpi_top_slices")
    fpi = float((fpi_out / "case.nii.gz.txt").read_text())
    assert 0 <= fpi <= 1 and fpi != ours
    # another aggregation than the operating points': no flags
    assert "not what the brain operating points were measured with" in result.stdout + result.stderr

    # the exports: the 2D network alone (slices in, slice maps out), put back inside the slice loop by the ensemble;
    # inference from them gives the state dicts' map
    from scripts.export import export_dataset

    record = export_dataset(models, "brain", bundle_root=ROOT / "bundle")
    assert record["slice_axis"] == 2 and max(record["max_abs_diff"].values()) <= 1e-4
    assert torch.jit.load(str(models / "brain" / "fold_0.ts"))(torch.zeros(3, 1, 32, 32)).shape == (3, 1, 32, 32)
    for fmt in ("torchscript", "onnx"):
        run_bundle("-m", "monai.bundle", "run", "--meta_file", "bundle/configs/metadata.json", "--bundle_root",
                   "bundle", "--config_file", repr([str(ROOT / "bundle/configs" / n) for n in
                                                    ("common.yaml", "inference.yaml", "brain.yaml")]),
                   "--dataset_dir", str(inputs), "--output_dir", str(tmp_path / fmt), "--mode", "pixel",
                   "--models_dir", str(models), "--model_format", fmt)
        exported = np.asarray(nib.load(tmp_path / fmt / "case.nii.gz").dataobj)
        np.testing.assert_allclose(exported, pixel, atol=1e-3)
        assert np.all(exported[..., :3] == 0)
