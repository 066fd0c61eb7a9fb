"""The HTML report: self-contained, one entry per case, AP table equal to evaluate.py, CLI output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from scripts.evaluate import evaluate
from tools.report import fmt_metric, write_report
from tools.toy_data import write_toy_dataset

ROOT = Path(__file__).resolve().parents[1]
N_TOY = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    write_toy_dataset(root, "brain", n_train=1, n_toy=N_TOY, size=32, seed=0)
    data = root / "brain"
    pixel, sample = root / "pred" / "pixel", root / "pred" / "sample"
    pixel.mkdir(parents=True)
    sample.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for path in sorted((data / "toy_label" / "pixel").iterdir()):
        img = nib.load(str(path))
        mask = np.asarray(img.dataobj, dtype=np.float32)
        pred = ndi.gaussian_filter(mask, 1.0) + 0.1 * rng.random(mask.shape, dtype=np.float32)
        nib.save(nib.Nifti1Image(np.clip(pred, 0, 1).astype(np.float32), img.affine), pixel / path.name)
        label = float((data / "toy_label" / "sample" / f"{path.name}.txt").read_text())
        score = float(np.clip(label * 0.6 + 0.5 * rng.random(), 0, 1))
        (sample / f"{path.name}.txt").write_text(f"{score}\n")
    return data, pixel, sample


def test_report_html(dataset, tmp_path):
    data, pixel, sample = dataset
    path = write_report(data, pixel, sample, output_dir=tmp_path / "out", title="toy report", seconds_per_case=1.5)
    text = path.read_text()
    assert path.is_file() and path.suffix == ".html"
    # self-contained: embedded images only, no external references
    assert text.count("data:image/png;base64,") == N_TOY + 1
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", text)
    assert "http" not in text
    # one entry per case, with kinds from anomalies.json
    meta = json.loads((data / "toy_label" / "anomalies.json").read_text())["cases"]
    assert text.count("<div class='case'") == N_TOY
    for name in meta:
        assert f"data-case='{name}'" in text
    # overall AP and AUROC equal evaluate.py's
    ev_pixel, ev_sample = evaluate(data, pixel, "pixel"), evaluate(data, sample, "sample")
    overall = re.search(r"<tr class='overall'[^>]*>(.*?)</tr>", text).group(1)
    cells = re.findall(r"<td>(.*?)</td>", overall)
    assert cells[:3] == ["overall", str(N_TOY), str(ev_sample["n_positive_cases"])]
    assert cells[3:] == [fmt_metric(ev_pixel["average_precision"]), fmt_metric(ev_pixel["auroc"]),
                         fmt_metric(ev_sample["average_precision"]), fmt_metric(ev_sample["auroc"])]
    # a row per anomaly kind present, pooling that kind's cases and the normal cases
    kinds = sorted({k for c in meta.values() if c["label"] for k in c["kinds"]})
    assert kinds
    groups = re.findall(r"<tr class='kind' data-group='([^']*)'>", text)
    assert groups == kinds
    n_normal = sum(1 for c in meta.values() if not c["label"])
    for kind in kinds:
        row = re.search(rf"data-group='{kind}'>(.*?)</tr>", text).group(1)
        n_kind = sum(1 for c in meta.values() if c["label"] and kind in c["kinds"])
        assert re.findall(r"<td>(.*?)</td>", row)[1] == str(n_kind + n_normal)
    assert "1.50 s per case" in text
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert len(pngs) == N_TOY + 1 and all((tmp_path / "out" / p).stat().st_size < 200_000 for p in pngs)


def test_report_cli_without_predictions(dataset, tmp_path):
    data, _, sample = dataset
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "bundle"), str(ROOT)]), MPLBACKEND="Agg")
    out = subprocess.run([sys.executable, "-m", "tools.report", "--data_dir", str(data), "--sample_dir",
                          str(sample), "--output_dir", str(tmp_path / "cli")],
                         capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    last = out.stdout.strip().splitlines()[-1]
    assert last == f"report: {tmp_path / 'cli' / 'report.html'}"
    text = (tmp_path / "cli" / "report.html").read_text()
    assert text.count("<div class='case'") == N_TOY
    assert "pixel AP</th>" not in text and "sample AP</th>" in text
