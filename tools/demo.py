"""The one-command demo: toy MOOD data scored with the shipped weights, evaluation, report.

    make demo        (PYTHONPATH=bundle:. python -m tools.demo [--output_dir outputs/demo] [--size 128] [--cases 6])

Writes a small toy set in the MOOD layout (``tools.toy_data``: test anomalies of kinds the training never
made), scores it with ``docker/run_mood.sh both`` (the body of the four MOOD entry points, from this checkout,
with the weights in ``bundle/models``: one pass of the ensemble for the pixel maps and the sample scores),
evaluates both tasks with MOOD's semantics, writes one self-contained HTML report and prints ``report: <path>``
as its last line.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import subprocess
import time
from pathlib import Path

from scripts.evaluate import evaluate
from tools.report import write_report
from tools.toy_data import write_toy_dataset

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("brain", "abdom")
# the side of the shipped models' training scans (bundle/models/README.md), on which their operating points were
# measured: the flags at those thresholds hold for scans like them (a 64^3 toy set upsampled to the 128^3 grid
# scored every case above the 5 % threshold)
DEMO_SIZE = 128


def run_script(mode: str, dataset: str, cases: Path, predictions: Path, models_dir: Path | None = None,
               quiet: bool = False, worklist: bool = False) -> float:
    """Run one MOOD entry point as the grader does (``run_{mode}_{dataset}.sh``), or for ``mode='both'`` their
    shared body ``run_mood.sh both`` (one pass, both outputs); ``models_dir``: ``MOOD_MODELS_DIR``, default the
    shipped weights; ``quiet``: its log only in the error; ``worklist``: also ``scores.csv`` (``MOOD_WORKLIST``).
    Returns its wall time in seconds."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if models_dir is not None:
        env["MOOD_MODELS_DIR"] = str(models_dir)
    if worklist:
        env["MOOD_WORKLIST"] = "1"
    script = ["run_mood.sh", mode, dataset] if mode == "both" else [f"run_{mode}_{dataset}.sh"]
    command = ["bash" if mode == "both" else "sh", str(REPO / "docker" / script[0]), *script[1:]]
    start = time.perf_counter()
    result = subprocess.run([*command, str(cases), str(predictions)], env=env, capture_output=quiet, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(script)} failed ({result.returncode})"
                           + (f": {result.stderr[-2000:]}" if quiet else ""))
    return time.perf_counter() - start


def _body(path: Path) -> str:
    text = path.read_text()
    match = re.search(r"<body[^>]*>(.*)</body>", text, re.S)
    return match.group(1) if match else text


def _summary_table(summary: dict) -> str:
    """The demo's numbers as an HTML table: AP of both tasks and the seconds per case, per dataset."""
    rows = "".join(f"<tr><td>{html.escape(dataset)}</td><td>{values['pixel_ap']:.3f}</td>"
                   f"<td>{values['sample_ap']:.3f}</td><td>{values['seconds_per_case']:.1f}</td></tr>"
                   for dataset, values in summary.items())
    return ("<table><thead><tr><th>dataset</th><th>pixel AP</th><th>sample AP</th><th>seconds per case</th></tr>"
            f"</thead><tbody>{rows}</tbody></table>")


def run_demo(output_dir: str | Path = "outputs/demo", size: int = DEMO_SIZE, cases: int = 6, seed: int = 0) -> Path:
    output = Path(output_dir).resolve()
    start = time.perf_counter()
    summary, sections = {}, []
    for dataset in DATASETS:
        write_toy_dataset(output / "data", dataset, n_train=0, n_toy=cases, size=size, seed=seed)
        data_dir = output / "data" / dataset
        predictions = output / "predictions" / dataset
        # the worklist too (scores.csv): the report lists the cases by score and flags them at the operating point
        seconds = run_script("both", dataset, data_dir / "toy", predictions, worklist=True)
        scores = {mode: evaluate(data_dir, predictions, mode) for mode in ("pixel", "sample")}
        report = write_report(data_dir, pixel_dir=predictions, sample_dir=predictions,
                              output_dir=output / "report" / dataset, title=f"{dataset}: toy test set",
                              seconds_per_case=seconds / cases)
        summary[dataset] = {
            "pixel_ap": scores["pixel"]["average_precision"], "sample_ap": scores["sample"]["average_precision"],
            "seconds_per_case": seconds / cases,
        }
        sections.append(f"<section>{_body(report)}</section>")  # the report's own heading names the dataset
    total = time.perf_counter() - start
    (output / "demo.json").write_text(json.dumps({**summary, "total_seconds": total}, indent=1) + "\n")
    index = output / "report.html"
    index.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>MOOD anomaly bundle demo</title></head><body>"
        "<p>Toy MOOD test cases (anomaly kinds the training never made), scored for both MOOD tasks in one pass "
        f"with the shipped weights in {total:.0f} s.</p>" + _summary_table(summary)
        + "".join(sections) + "</body></html>\n"
    )
    return index


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--size", type=int, default=DEMO_SIZE,
                        help="side of the toy volumes (default: the shipped models' training scans'; MOOD: 256 brain, "
                             "512 abdomen)")
    parser.add_argument("--cases", type=int, default=6, help="toy test cases per dataset (half normal)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    index = run_demo(args.output_dir, args.size, args.cases, args.seed)
    print(f"report: {index}")
    return index


if __name__ == "__main__":
    main()
