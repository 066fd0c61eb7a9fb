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
    from tools.phantoms import write_normal_scans

    root = tmp_path_factory.mktemp("normals")
    return {name: write_normal_scans(root / name, name, count=10, size=36)[0].parent for name in ("brain", "abdom")}


FINGERPRINT = {"percentile_00_5": -1000.0, "percentile_99_5": 1000.0, "mean": -100.0, "std": 400.0}


def write_models(models_dir: Path, dataset: str, folds, fingerprint: dict | None = None, **settings) -> Path:
    """Fold models of random weights as training leaves them: ``plans.json`` (training's defaults with
    ``settings`` overriding its keys, e.g. ``network_depth=3``) and one ``fold_<k>.pt`` state dict per fold."""
    from scripts.networks import build_network
    from scripts.plans import default_plan, ensure_plan

    if dataset == "abdom":
        fingerprint = fingerprint or FINGERPRINT
    plan = default_plan(dataset, fingerprint=fingerprint, **settings)
    folder = Path(models_dir) / dataset
    ensure_plan(folder, plan)
    for fold in folds:
        torch.manual_seed(fold)
        torch.save(build_network(plan).state_dict(), folder / f"fold_{fold}.pt")
    return Path(models_dir)


@pytest.fixture(scope="session")
def default_models(tmp_path_factory):
    """Two folds per dataset of the default network (random weights), planned at a 32^3 working grid."""
    models = tmp_path_factory.mktemp("models")
    for dataset in ("brain", "abdom"):
        write_models(models, dataset, (0, 1), spatial_size=[32, 32, 32])
    return models


# the plan round trip: a model of another width and grid than the defaults, as training leaves it
PLANNED = {"network_base_filters": 16, "network_depth": 3, "spatial_size": [48, 48, 48]}


@pytest.fixture(scope="session")
def planned_models(normal_scans, tmp_path_factory):
    """One brain fold trained through ``scripts.training`` (which writes the plan before the folds) with 16 base
    filters at a 48^3 working grid; returns the run folder (its ``models/`` is what consumers get)."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    run = tmp_path_factory.mktemp("planned") / "run"
    overrides = [f"--{key}={value!r}".replace(" ", "") for key, value in PLANNED.items()]
    command = [sys.executable, "-m", "scripts.training", "--config_file",
               *(str(root / "bundle/configs" / n) for n in ("common.yaml", "train.yaml", "brain.yaml")),
               "--output_dir", str(run), "--folds", "0", "--dataset_dir", str(normal_scans["brain"]),
               "--cache_dir", str(run.parent / "cache"), "--max_epochs", "1", "--num_workers", "0",
               "--max_val_samples", "4", *overrides]
    env = dict(os.environ, PYTHONPATH=str(root / "bundle"))
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return run
