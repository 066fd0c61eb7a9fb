"""Configs are data: no Python control flow inside ``$`` expressions (logic lives in named functions of the
bundle's code), and the model card stays a card."""

from __future__ import annotations

import re
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
    skipped = (".git", ".venv", ".deploy-venv", "outputs", "__pycache__")
    tracked = [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in suffixes
               and not any(part in skipped for part in p.parts)]
    pattern = re.compile(r"(?<![\w.])/(work|root|home/\w+)/[\w.-]+/")
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in tracked if p != Path(__file__)
            for m in pattern.finditer(p.read_text(errors="ignore"))]
    assert not hits, hits
