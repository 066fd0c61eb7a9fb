"""The demo end to end on a tiny toy set: run scripts, evaluation, one self-contained report; what the terminal
shows (the progress, the numbers, the report's path) and what goes to the log."""

from __future__ import annotations

import json
import os
import re

import pytest

from tools import demo
from tools.demo import main
from tools.report import STYLE


def test_demo_writes_a_report_and_prints_its_path_last(default_models, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOOD_MODELS_DIR", str(default_models))
    index = main(["--output_dir", str(tmp_path / "demo"), "--size", "32", "--cases", "2"])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[-1] == f"report: {index}"
    text = index.read_text()
    assert "data:image/png;base64," in text and text.count("<section>") == 2 and 'src="http' not in text
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    for dataset in ("brain", "abdom"):
        assert 0.0 <= summary[dataset]["pixel_ap"] <= 1.0 and 0.0 <= summary[dataset]["sample_ap"] <= 1.0
        predictions = sorted(p.name for p in (tmp_path / "demo" / "predictions" / dataset).iterdir())
        assert predictions == ["scores.csv", "toy_0.nii.gz", "toy_0.nii.gz.txt", "toy_1.nii.gz", "toy_1.nii.gz.txt"]
    # the summary is a table with rounded numbers, not JSON; one top heading per dataset
    assert "<th>pixel AP</th>" in text and "{" not in text.split("</head>")[1].split("<section>")[0]
    assert text.count("<h1") == 2

    # the terminal: just before the report's path, a plain-text table of the numbers of demo.json, one row per
    # dataset in the demo's order
    header, *rows = lines[-4:-1]
    assert header.split() == ["dataset", "pixel", "AP", "sample", "AP", "seconds", "per", "case"]
    for row, dataset in zip(rows, ("brain", "abdom")):
        values = summary[dataset]
        assert row.split() == [dataset, f"{values['pixel_ap']:.3f}", f"{values['sample_ap']:.3f}",
                               f"{values['seconds_per_case']:.1f}"]
    assert "<" not in "".join(lines[-4:])  # plain text, no HTML

    # the progress stays on the terminal: a line per case and a summary line per run; the run scripts' command
    # lines and MONAI's summaries go to the log, named once on the terminal
    log = tmp_path / "demo" / "demo.log"
    assert out.count(str(log)) == 1
    progress = [line for line in lines if re.match(r"\[\d+/\d+\] toy_\d\.nii\.gz: ", line)]
    assert len(progress) == 4 and sum(line.startswith("summary: 2 done, 0 failed") for line in lines) == 2
    assert "run_mood:" not in out and "PYTHONPATH" not in out and "monai.bundle" not in out
    logged = log.read_text()
    assert logged.count("run_mood: running:") == 2 and "run_mood: PYTHONPATH=" in logged
    assert all(line in logged for line in progress)

    # the index page has the report's own style: its stylesheet once, in the head, over the page's own table
    # (the embedded reports' copies removed)
    head, body = text.split("</head>", 1)
    assert f"<style>{STYLE}</style>" in head and text.count("<style>") == 1
    assert re.search(r"<body><div class='mood-report'>.*?<th>pixel AP</th>.*?</div><section>", body, re.S)
    assert all(section.lstrip().startswith("<div class='mood-report'>") for section in body.split("<section>")[1:])


def test_run_script_streams_to_the_log_and_fails_with_its_last_lines(tmp_path, capsys):
    """A run that stops before inference (no input folder): the error names the script and carries the log's
    last lines; nothing but progress lines reaches the terminal."""
    log = tmp_path / "demo.log"
    log.write_text("earlier run\n")
    with pytest.raises(RuntimeError) as failed:
        demo.run_script("both", "brain", tmp_path / "absent", tmp_path / "pred", log=log)
    message = str(failed.value)
    assert message.startswith("run_mood.sh both brain failed (exit code 1)") and str(log) in message
    assert f"run_mood: error: input folder '{tmp_path / 'absent'}' does not exist" in message
    assert "earlier run" not in message  # only this run's lines
    assert log.read_text().startswith("earlier run\n") and "does not exist" in log.read_text()  # appended
    assert capsys.readouterr().out == ""


def test_only_progress_lines_are_echoed_whatever_the_command(tmp_path, capsys):
    """The filter keys on the progress lines' format (scripts.inference.progress.ProgressReporter), not on the command
    that prints them; stderr is read with stdout."""
    script = "; ".join([
        "echo 'run_mood: running: python -m scripts.predict --dataset_dir x'",
        "echo '--- input summary of monai.bundle.scripts.run ---'",
        "echo '[1/2] case_a.nii.gz: 1.2 s score 0.1234 (load 0.1, network 0.9 s); 1 s left'",
        "echo '[2/2] case_b.nii.gz: FAILED: unreadable' >&2",
        "echo 'summary: 1 done, 1 failed, 1.2 s per case, 2.5 s in all' >&2",
    ])
    code, tail = demo._stream(["bash", "-c", script], dict(os.environ), tmp_path / "run.log", echo=True)
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and [line.split(":")[0] for line in out] == ["[1/2] case_a.nii.gz", "[2/2] case_b.nii.gz",
                                                                  "summary"]
    assert (tmp_path / "run.log").read_text().splitlines() == [line.rstrip("\n") for line in tail]
    assert len(tail) == 5
