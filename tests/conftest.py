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


def write_normal_scans(folder: Path, dataset: str, count: int, size: int = 36) -> list[Path]:
    """Tiny NIfTI "normal scans": deformed MNI152 brains (positive MRI-like intensities, float32) or CT
    phantoms (int16 Hounsfield units), with anisotropic affines as real scans have."""
    import nibabel as nib
    import numpy as np

    from scripts.phantoms import brain_partner, ct_phantom, mni152_brain

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    if dataset == "brain":
        template, foreground = mni152_brain(size)
    for i in range(count):
        if dataset == "brain":
            volume, _ = brain_partner(template, foreground, seed=i)
            volume = ((volume - volume.min()) * 100.0).astype(np.float32)
            affine = np.diag([2.0, 2.0, 2.2, 1.0])
        else:
            volume, _ = ct_phantom(size, seed=i)
            volume = volume.astype(np.int16)
            affine = np.diag([3.0, 3.0, 2.5, 1.0])
        path = folder / f"{dataset}_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(volume, affine), path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def normal_scans(tmp_path_factory):
    """Ten tiny brain and ten tiny abdominal normal scans, written once per test session."""
    root = tmp_path_factory.mktemp("normals")
    return {name: write_normal_scans(root / name, name, 10)[0].parent for name in ("brain", "abdom")}
