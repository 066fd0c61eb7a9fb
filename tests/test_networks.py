"""The output-prior initialisation of the anomaly network."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DynUNet

from scripts.networks import with_output_prior


def small_unet() -> DynUNet:
    return DynUNet(3, 1, 1, kernel_size=[[3, 3, 3]] * 3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                   upsample_kernel_size=[[2, 2, 2]] * 2, filters=[4, 8, 16], norm_name="instance")


@pytest.mark.parametrize("prior", [0.01, 0.2])
def test_initial_predictions_sit_at_the_prior(prior):
    with torch.no_grad():
        torch.manual_seed(0)
        default = torch.sigmoid(small_unet()(torch.randn(2, 1, 16, 16, 16))).mean()
        torch.manual_seed(0)
        network = with_output_prior(small_unet(), prior)
        initial = torch.sigmoid(network(torch.randn(2, 1, 16, 16, 16))).mean()
    assert abs(float(default) - prior) > 0.1  # the default initialisation starts far from it
    assert abs(float(initial) - prior) < 0.5 * prior


def test_none_keeps_the_default_and_bad_priors_are_rejected():
    network = small_unet()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    assert with_output_prior(network, None) is network
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    with pytest.raises(ValueError, match=r"prior must be in \(0, 1\)"):
        with_output_prior(network, 1.0)


def test_patch_models_see_a_whole_scan_in_one_pass_or_in_weighted_sliding_windows():
    from monai.inferers import SimpleInferer, SlidingWindowInferer

    from scripts.networks import make_inferer

    assert isinstance(make_inferer(None), SimpleInferer) and isinstance(make_inferer(None, True), SimpleInferer)
    assert isinstance(make_inferer([16, 16, 8]), SimpleInferer)  # patch models in one pass unless asked
    windows = make_inferer([16, 16, 8], sliding_window=True)
    assert isinstance(windows, SlidingWindowInferer) and list(windows.roi_size) == [16, 16, 8]
    image = torch.randn(1, 1, 40, 36, 20)
    calls = []

    def voxelwise(x):  # a network whose output at a voxel depends on that voxel alone
        calls.append(tuple(x.shape))
        return 3 * x + 1

    with torch.no_grad():
        blended = windows(image, voxelwise)
    assert all(shape == (1, 1, 16, 16, 8) for shape in calls) and len(calls) > 8
    # the Gaussian weights of the overlapping windows sum to one wherever they are: the whole scan's map exactly
    assert blended.shape == image.shape and torch.allclose(blended, 3 * image + 1, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(make_inferer(None)(image, voxelwise), 3 * image + 1)


def test_a_training_pass_in_bf16_or_channels_last_gives_the_fp32_map_and_float32_gradients():
    from scripts.networks import PrecisionInferer, with_memory_format

    torch.manual_seed(0)
    network = small_unet()
    x = torch.randn(2, 1, 16, 16, 16)
    reference = PrecisionInferer()(x, network)
    assert torch.equal(reference, network(x))  # fp32: the plain pass
    bf16 = PrecisionInferer(precision="bf16")(x, network)
    assert bf16.dtype == torch.float32 and torch.allclose(torch.sigmoid(bf16), torch.sigmoid(reference), atol=0.05)
    bf16.mean().backward()
    assert all(p.grad.dtype == torch.float32 for p in network.parameters() if p.grad is not None)
    layered = with_memory_format(small_unet(), channels_last=True)
    layered.load_state_dict(network.state_dict())  # the same state dict in either layout
    assert any(p.is_contiguous(memory_format=torch.channels_last_3d) and not p.is_contiguous()
               for p in layered.parameters())
    with torch.no_grad():
        assert torch.allclose(PrecisionInferer(channels_last=True)(x, layered), reference.detach(), atol=1e-5)
    with pytest.raises(ValueError, match="precision must be one of"):
        PrecisionInferer(precision="fp16")


def test_channels_last_follows_the_network_s_dimensions():
    from scripts.networks import PrecisionInferer, with_memory_format

    net2d = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1))
    reference_weights = {k: v.clone() for k, v in net2d.state_dict().items()}
    layered = with_memory_format(net2d, channels_last=True)  # a 2D network: 2D channels-last, no error
    assert layered[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(reference_weights[k], v) for k, v in layered.state_dict().items())
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        assert torch.allclose(PrecisionInferer(channels_last=True)(x, layered), layered(x), atol=1e-6)
