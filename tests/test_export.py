"""Model-zoo checks and exports: verify_metadata, verify_net_in_out, ckpt_export (TorchScript) and onnx_export
through MONAI's bundle CLI for both dataset configs; exports equal the state dicts; inference from TorchScript or
ONNX gives the same outputs as from the state dicts."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from scripts.export import ONNX_CONVERTER_KWARGS, export_dataset, probe_volume
from scripts.inference.ensemble import OnnxNetwork, load_ensemble, model_files
from scripts.io.files import bundle_configs
from scripts.networks import build_network
from scripts.plans import load_plan

ROOT = Path(__file__).resolve().parents[1]
META = "bundle/configs/metadata.json"
TOLERANCE = 1e-4


def bundle_cli(*args: str, check: bool = True, **env_vars: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bundle"), **env_vars)
    result = subprocess.run([sys.executable, "-m", "monai.bundle", *map(str, args)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def configs(dataset: str) -> str:
    return repr(bundle_configs("bundle", "inference", dataset))


def reference_network(dataset: str, state_dict: Path) -> torch.nn.Module:
    """The network of the plan next to ``state_dict``, with its weights."""
    network = build_network(load_plan(state_dict.parent.parent, dataset))
    network.load_state_dict(torch.load(state_dict, map_location="cpu", weights_only=True))
    return network.eval()


def test_verify_metadata_cli_offline():
    bundle_cli("verify_metadata", "--meta_file", META, "--filepath", "tests/fixtures/meta_schema_20240725.json")


@pytest.mark.parametrize("dataset", ["brain"])  # the shipped abdomen models are voxel classifiers: no network
def test_model_zoo_checks_and_exports_of_the_shipped_models(dataset, tmp_path):
    # the metadata's 16*n grid with n=2: the bottleneck of the 5-level network must keep more than one voxel
    # the network comes from the plan of the shipped models (bundle/models/<dataset>/plans.json)
    bundle_cli("verify_net_in_out", "network_def", "--meta_file", META, "--config_file", configs(dataset), "--n", "2",
               "--bundle_root", "bundle")
    state_dict = ROOT / "bundle/models" / dataset / "fold_0.pt"
    common = ["--ckpt_file", state_dict, "--meta_file", META, "--config_file", configs(dataset), "--key_in_ckpt", "",
              "--bundle_root", "bundle"]
    bundle_cli("ckpt_export", "network_def", "--filepath", tmp_path / "fold_0.ts", *common)
    bundle_cli("onnx_export", "network_def", "--filepath", tmp_path / "fold_0.onnx", *common, "--use_trace", "True",
               "--input_shape", "[1, 1, 64, 64, 64]", "--converter_kwargs", repr(ONNX_CONVERTER_KWARGS))

    reference = reference_network(dataset, state_dict)
    scripted = torch.jit.load(str(tmp_path / "fold_0.ts"))
    onnx = OnnxNetwork(tmp_path / "fold_0.onnx")
    # the working grid of the shipped models, and another grid: the ONNX spatial axes are dynamic
    # (the maps, as inference averages them: the sigmoid of the logits)
    for x in (probe_volume([64, 64, 64]), probe_volume([32, 48, 64], seed=1)):
        with torch.no_grad():
            expected = torch.sigmoid(reference(x))
            assert expected.std() > 0
            assert (torch.sigmoid(scripted(x)) - expected).abs().max() <= TOLERANCE
            assert (torch.sigmoid(onnx(x)) - expected).abs().max() <= TOLERANCE


def test_verify_net_in_out_catches_a_network_that_breaks_the_metadata():
    two_channels = ("$scripts.networks.build_network({**@plan['network'], "
                    "'args': {**@plan['network']['args'], 'out_channels': 2}})")
    result = bundle_cli("verify_net_in_out", "network_def", "--meta_file", META, "--config_file", configs("brain"),
                        "--n", "2", "--bundle_root", "bundle", "--network_def", two_channels, check=False)
    assert result.returncode != 0
    assert "channel" in (result.stdout + result.stderr).lower()


@pytest.fixture(scope="module")
def models(default_models, tmp_path_factory):
    """A private copy of the default-network folds (random weights, 32^3 grid) with the brain folds exported."""
    copy = Path(shutil.copytree(default_models, tmp_path_factory.mktemp("export") / "models"))
    export_dataset(copy, "brain", bundle_root=ROOT / "bundle")
    return copy


def test_export_dataset_writes_every_fold_and_records_the_differences(models):
    record = export_dataset(models, "abdom", bundle_root=ROOT / "bundle")
    folder = models / "abdom"
    for fmt in ("torchscript", "onnx"):
        assert [p.stem for p in model_files(models, "abdom", fmt)] == ["fold_0", "fold_1"]
        assert 0.0 <= record["max_abs_diff"][fmt] <= TOLERANCE
        # the ensemble's map as inference makes it (the Predictor with --model_format) matches the state dicts'
        assert 0.0 <= record["ensemble_max_abs_diff"][fmt] <= TOLERANCE
    assert json.loads((folder / "export.json").read_text()) == record
    with pytest.raises(ValueError, match="abdom.*differ"):  # the check is live: nothing passes a negative tolerance
        export_dataset(models, "abdom", formats=["onnx"], bundle_root=ROOT / "bundle", tolerance=-1.0)


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_ensembles_of_all_formats_agree_and_stale_or_missing_exports_are_reported(models, tmp_path, monkeypatch):
    models = Path(shutil.copytree(models, tmp_path / "models"))  # this test makes an export stale
    # listen on the module's logger itself: earlier tests may have reconfigured logging (MONAI's logging.conf)
    inference_logger, warnings = logging.getLogger("scripts.inference.ensemble"), Collect()
    monkeypatch.setattr(inference_logger, "disabled", False)
    monkeypatch.setattr(inference_logger, "level", logging.NOTSET)
    inference_logger.addHandler(warnings)
    network_def = reference_network("brain", models / "brain/fold_0.pt")
    x = probe_volume([32, 32, 32])
    with torch.no_grad():
        outputs = {fmt: load_ensemble(network_def, models, "brain", "cpu", fmt)(x)
                   for fmt in ("pytorch", "torchscript", "onnx")}
    assert outputs["pytorch"].std() > 0
    for fmt in ("torchscript", "onnx"):
        assert (outputs[fmt] - outputs["pytorch"]).abs().max() <= TOLERANCE

    state_dict = models / "brain/fold_1.pt"
    exported = state_dict.with_suffix(".ts").stat().st_mtime
    os.utime(state_dict, (exported + 60, exported + 60))  # retrained after the export
    try:
        load_ensemble(network_def, models, "brain", "cpu", "torchscript")
    finally:
        inference_logger.removeHandler(warnings)
    assert any("fold_1.ts is older than fold_1.pt" in m for m in warnings.messages), warnings.messages

    shutil.rmtree(models / "abdom")
    shutil.copytree(models / "brain", models / "abdom", ignore=shutil.ignore_patterns("*.onnx"))
    with pytest.raises(FileNotFoundError, match="make export"):
        load_ensemble(network_def, models, "abdom", "cpu", "onnx")
    with pytest.raises(ValueError, match="model_format"):
        load_ensemble(network_def, models, "brain", "cpu", "tensorrt")


def run_inference(input_dir: Path, output_dir: Path, mode: str, models: Path, model_format: str) -> None:
    # on the CPU, in float32: on a GPU the state dicts run in mixed precision and cuDNN's TF32 (about 1e-3 apart),
    # while the ONNX models run on onnxruntime's CPU provider unless its GPU build is installed
    bundle_cli("run", "--meta_file", META, "--bundle_root", "bundle", "--config_file", configs("brain"),
               "--dataset_dir", input_dir, "--output_dir", output_dir, "--mode", mode, "--models_dir", models,
               "--model_format", model_format, "--pixel_map_dtype", "float32", CUDA_VISIBLE_DEVICES="")


def test_inference_from_exports_gives_the_same_outputs(models, normal_scans, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in sorted(normal_scans["brain"].glob("*.nii.gz"))[:3]:
        shutil.copy(path, inputs / path.name)
    maps, scores = {}, {}
    for fmt in ("pytorch", "torchscript", "onnx"):
        run_inference(inputs, tmp_path / fmt, "pixel", models, fmt)
        maps[fmt] = np.stack([np.asanyarray(nib.load(p).dataobj) for p in sorted((tmp_path / fmt).glob("*.nii.gz"))])
    for fmt in ("pytorch", "onnx"):
        run_inference(inputs, tmp_path / f"{fmt}_sample", "sample", models, fmt)
        scores[fmt] = np.array([float(p.read_text()) for p in sorted((tmp_path / f"{fmt}_sample").glob("*.txt"))])
    assert maps["pytorch"].shape[0] == 3 and maps["pytorch"].std() > 0
    for fmt in ("torchscript", "onnx"):
        np.testing.assert_allclose(maps[fmt], maps["pytorch"], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(scores["onnx"], scores["pytorch"], atol=TOLERANCE, rtol=0)
