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


def test_bundle_version_is_the_same_everywhere():
    import re
    import tomllib

    version = json.loads(METADATA.read_text())["version"]
    assert version in json.loads(METADATA.read_text())["changelog"]
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == version
    app = re.search(r'^\s*version = "([^"]+)"', (ROOT / "deploy" / "app.py").read_text(), re.MULTILINE)
    assert app and app.group(1) == version
    app_yaml = re.search(r"^\s*version:\s*(\S+)", (ROOT / "deploy" / "app.yaml").read_text(), re.MULTILINE)
    assert app_yaml and app_yaml.group(1) == version
    map_tag = re.search(r"^MAP_TAG \?= \S+:(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert map_tag and map_tag.group(1) == version


# import name -> distribution name, where they differ
DISTRIBUTIONS = {"ignite": "pytorch-ignite", "sklearn": "scikit-learn", "yaml": "pyyaml", "PIL": "pillow"}
# the base requirements, which metadata.json records in its own keys
BASE = {"torch", "monai", "numpy"}


def test_every_package_the_bundle_imports_is_in_required_packages_version():
    import ast
    import sys

    imported = set()
    for path in (ROOT / "bundle" / "scripts").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported if name not in sys.stdlib_module_names} - BASE - {"scripts", "__future__"}
    assert third_party, "no third-party imports found: the scan is broken"
    required = json.loads(METADATA.read_text())["required_packages_version"]
    missing = sorted(DISTRIBUTIONS.get(name, name) for name in third_party
                     if DISTRIBUTIONS.get(name, name) not in required)
    assert not missing, f"imported by bundle/scripts but not in required_packages_version: {missing}"
    # the configs are YAML and the training workflow logs to TensorBoard with a tqdm progress bar
    assert {"pyyaml", "tensorboard", "tqdm"} <= set(required)
