"""The demo end to end on a tiny toy set: run scripts, evaluation, one self-contained report."""

from __future__ import annotations

import json

from tools.demo import main


def test_demo_writes_a_report_and_prints_its_path_last(default_models, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOOD_MODELS_DIR", str(default_models))
    index = main(["--output_dir", str(tmp_path / "demo"), "--size", "32", "--cases", "2"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"report: {index}"
    text = index.read_text()
    assert "data:image/png;base64," in text and text.count("<section>") == 2 and 'src="http' not in text
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    for dataset in ("brain", "abdom"):
        assert 0.0 <= summary[dataset]["pixel_ap"] <= 1.0 and 0.0 <= summary[dataset]["sample_ap"] <= 1.0
        predictions = sorted(p.name for p in (tmp_path / "demo" / "predictions" / dataset).iterdir())
        assert predictions == ["scores.csv", "toy_0.nii.gz", "toy_0.nii.gz.txt", "toy_1.nii.gz", "toy_1.nii.gz.txt"]
    # the summary is a table with rounded numbers, not JSON; one top heading per dataset
    assert "<th>pixel AP</th>" in text and "{" not in text.split("<section>")[0]
    assert text.count("<h1") == 2
