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
