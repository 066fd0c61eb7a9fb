"""Shared fixtures: small textured images with a foreground, a partner of the same "dataset" and a
foreign scan of another, in 2D and 3D, so every test exercises the real engine on tiny inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))


def textured_scan(spatial: tuple[int, ...], seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(image (1, *spatial), foreground) : a noisy textured ellipsoid on a constant background."""
    gen = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(-1, 1, n, dtype=torch.float64) for n in spatial]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    radius = grid.pow(2).sum(0).sqrt()
    foreground = radius < 0.8
    phase = torch.rand(len(spatial), generator=gen, dtype=torch.float64) * 6.28
    texture = sum(torch.sin((3 + i) * grid[i] + phase[i]) for i in range(len(spatial)))
    image = 100.0 + 30.0 * texture + 5.0 * torch.randn(spatial, generator=gen, dtype=torch.float64)
    image = torch.where(foreground, image, torch.zeros_like(image))
    return image[None].to(dtype), foreground


@pytest.fixture(params=[(40, 36), (24, 22, 20)], ids=["2d", "3d"])
def scans(request):
    spatial = request.param
    image, foreground = textured_scan(spatial, seed=0)
    partner, _ = textured_scan(spatial, seed=1)
    foreign = torch.rand((1, *[n + 5 for n in spatial]), generator=torch.Generator().manual_seed(2)) * 500 - 200
    return {"image": image, "foreground": foreground, "partner": partner, "foreign": foreign}


@pytest.fixture(scope="session")
def normal_scans(tmp_path_factory):
    """Ten tiny brain and ten tiny abdominal normal scans, written once per test session."""
    from scripts.phantoms import write_normal_scans

    root = tmp_path_factory.mktemp("normals")
    return {name: write_normal_scans(root / name, name, count=10, size=36)[0].parent for name in ("brain", "abdom")}


@pytest.fixture(scope="session")
def default_models(tmp_path_factory):
    """Two folds per dataset of the default network (random weights), recorded at a 32^3 working grid."""
    import json

    from monai.bundle import ConfigParser

    models = tmp_path_factory.mktemp("models")
    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[1] / "bundle/configs/inference.yaml"))
    for dataset in ("brain", "abdom"):
        folder = models / dataset
        folder.mkdir()
        for fold in (0, 1):
            torch.manual_seed(fold)
            network = parser.get_parsed_content("network_def", instantiate=True, lazy=False)
            torch.save(network.state_dict(), folder / f"fold_{fold}.pt")
            (folder / f"fold_{fold}.json").write_text(json.dumps({"spatial_size": [32, 32, 32]}))
    (models / "abdom" / "fingerprint.json").write_text(
        json.dumps({"percentile_00_5": -1000.0, "percentile_99_5": 1000.0, "mean": -100.0, "std": 400.0}))
    return models
