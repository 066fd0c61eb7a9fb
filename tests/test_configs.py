"""Configs are data: no Python control flow inside ``$`` expressions (logic lives in named functions of the
bundle's code), and the model card stays a card."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "bundle" / "configs").glob("*.yaml"))


def expressions(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from expressions(value)
    elif isinstance(node, list):
        for value in node:
            yield from expressions(value)
    elif isinstance(node, str) and node.startswith("$"):
        yield node


def test_no_if_or_for_inside_config_expressions():
    found = [(path.name, e) for path in CONFIGS for e in expressions(yaml.safe_load(path.read_text()))
             if re.search(r"\b(if|for|while|lambda)\b", e)]
    assert not found, found


def test_the_checker_sees_control_flow():
    assert list(expressions({"a": ["$x if y else z", "plain"], "b": {"c": "$f(x)"}})) == ["$x if y else z", "$f(x)"]


def test_the_model_card_is_a_card():
    card = ROOT / "bundle" / "docs" / "README.md"
    assert len(card.read_text().splitlines()) <= 300
    assert (ROOT / "bundle" / "docs" / "experiments" / "README.md").is_file()


def test_no_machine_paths_in_the_repository():
    suffixes = (".md", ".yaml", ".json", ".sh", ".py", ".conf")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()  # not what git ignores
    tracked = [ROOT / name for name in listed if name.endswith(suffixes) and (ROOT / name).is_file()]
    pattern = re.compile(r"(?<![\w.])/(work|root|home/\w+)/[\w.-]+/")
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in tracked if p != Path(__file__)
            for m in pattern.finditer(p.read_text(errors="ignore"))]
    assert not hits, hits


# the plan's setup keys (scripts.plans) and training's knobs of the same names: a knob feeds only the plan step
PLAN_KNOBS = ("spatial_size", "patch_size", "sliding_window", "slice_axis", "foreground_fraction", "normalisation",
              "sample_score_fraction", "sample_score_aggregation")
# what the plan step reads: its arguments, and the network it plans (the knobs that shape it)
PLAN_STEP = ("plan_settings", "network_spec", "network_dims")


def references(node, path=()):
    """(top-level key, referenced id) for every ``@id`` in a config, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from references(value, path + (str(key),))
    elif isinstance(node, list):
        for value in node:
            yield from references(value, path)
    elif isinstance(node, str):
        for ref in re.findall(r"@([\w#]+)", node):
            yield path[0].split("#")[0] if path else "", ref


def test_one_plan_read_everywhere():
    """No config repeats a plan value under its own name: the shared and inference configs define no key of the
    plan's and read the setup only as @plan (inference's own knobs of those names are null, "the plan's", and say
    what a run asks for instead); training's knobs of those names are read by the plan step alone."""
    inference = yaml.safe_load((ROOT / "bundle" / "configs" / "inference.yaml").read_text())
    overrides = [k for k in inference if k in PLAN_KNOBS]
    assert all(inference[k] is None for k in overrides), overrides
    assert "spatial_size" not in yaml.safe_load((ROOT / "bundle" / "configs" / "common.yaml").read_text())
    for path in CONFIGS:
        config = yaml.safe_load(path.read_text())
        own = overrides if path.name == "inference.yaml" else []
        misuse = [(key, ref) for key, ref in references(config) if ref in PLAN_KNOBS and key not in PLAN_STEP
                  and ref not in own]
        assert not misuse, (path.name, misuse)


def test_the_plan_checker_sees_a_knob_read_outside_the_plan_step():
    config = {"plan_settings": {"spatial_size": "@spatial_size"}, "resize": {"spatial_size": "@spatial_size"}}
    assert [(k, r) for k, r in references(config) if r in PLAN_KNOBS and k not in PLAN_STEP] == [
        ("resize", "spatial_size")]
