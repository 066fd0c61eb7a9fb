"""bundle/configs/metadata.json passes MONAI's verify_metadata offline against the official schema."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from monai.bundle import verify_metadata

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "tests" / "fixtures" / "meta_schema_20240725.json"
METADATA = ROOT / "bundle" / "configs" / "metadata.json"


def test_metadata_verifies_offline():
    verify_metadata(meta_file=str(METADATA), filepath=str(SCHEMA))


def test_verification_catches_a_missing_required_field(tmp_path):
    meta = json.loads(METADATA.read_text())
    del meta["network_data_format"]
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(meta))
    schema = tmp_path / SCHEMA.name
    shutil.copy(SCHEMA, schema)
    with pytest.raises(Exception, match="network_data_format"):
        verify_metadata(meta_file=str(broken), filepath=str(schema))


def test_metadata_versions_match_the_pinned_environment():
    import monai
    import numpy
    import torch

    meta = json.loads(METADATA.read_text())
    assert meta["monai_version"] == monai.__version__
    assert meta["numpy_version"] == numpy.__version__
    assert meta["pytorch_version"] == torch.__version__.split("+")[0]
    pyproject = (ROOT / "pyproject.toml").read_text()
    for package, version in meta["required_packages_version"].items():
        assert f'"{package}=={version}"' in pyproject, package
