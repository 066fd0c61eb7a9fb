"""The one-command demo: toy MOOD data scored with the shipped weights, evaluation, report.

    make demo        (PYTHONPATH=bundle:. python -m tools.demo [--output_dir outputs/demo] [--size 128] [--cases 6])

Writes a small toy set in the MOOD layout (``tools.toy_data``: test anomalies of kinds the training never
made), scores it with ``docker/run_mood.sh both`` (the body of the four MOOD entry points, from this checkout,
with the weights in ``bundle/models``: one pass of the ensemble for the pixel maps and the sample scores),
evaluates both tasks with MOOD's semantics, writes one self-contained HTML report and prints ``report: <path>``
as its last line, after a small table of the numbers (pixel AP, sample AP, seconds per case per dataset).

The terminal shows one line per scored case and the run's summary line; the rest of the run scripts' output
(their command lines, MONAI's input summaries and config output) goes to ``<output_dir>/demo.log``, named once
on the terminal. A failed run raises with the log's last lines.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import math
import os
import re
import subprocess
import time
from collections import deque
from pathlib import Path

from scripts.evaluate import evaluate
from scripts.io.files import MOOD_DATASETS
from tools.report import STYLE, write_report
from tools.toy_data import write_toy_dataset

REPO = Path(__file__).resolve().parents[1]
DATASETS = MOOD_DATASETS
# the side of the shipped models' training scans (bundle/models/README.md), on which their operating points were
# measured: the flags at those thresholds hold for scans like them (a 64^3 toy set upsampled to the 128^3 grid
# scored every case above the 5 % threshold)
DEMO_SIZE = 128
LOG_NAME = "demo.log"
# the inference's progress (scripts.inference.progress.ProgressReporter): one line per case, `[i/n] name: ...`, and the
# summary line, `summary: <n> done, <m> failed, ...`; whatever command prints them
PROGRESS_LINE = re.compile(r"\[\d+/\d+\] .*: |summary: \d+ done, \d+ failed")
TAIL_LINES = 25  # of a failed run's output, in its error


def run_script(mode: str, dataset: str, cases: Path, predictions: Path, models_dir: Path | None = None,
               quiet: bool = False, worklist: bool = False, log: Path | None = None) -> float:
    """Run one MOOD entry point as the grader does (``run_{mode}_{dataset}.sh``), or for ``mode='both'`` their
    shared body ``run_mood.sh both`` (one pass, both outputs); ``models_dir``: ``MOOD_MODELS_DIR``, default the
    shipped weights; ``worklist``: also ``scores.csv`` (``MOOD_WORKLIST``). Its output: by default on the terminal;
    with ``log``, appended to that file line by line, and only its progress lines (one per case, the summary)
    echoed to the terminal; ``quiet``: none on the terminal. Raises RuntimeError when it fails, with its last lines
    where they were captured (``log`` or ``quiet``). Returns its wall time in seconds."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if models_dir is not None:
        env["MOOD_MODELS_DIR"] = str(models_dir)
    if worklist:
        env["MOOD_WORKLIST"] = "1"
    script = ["run_mood.sh", mode, dataset] if mode == "both" else [f"run_{mode}_{dataset}.sh"]
    command = ["bash" if mode == "both" else "sh", str(REPO / "docker" / script[0]), *script[1:]]
    command += [str(cases), str(predictions)]
    start = time.perf_counter()
    if log is None and not quiet:
        returncode, tail = subprocess.run(command, env=env).returncode, None
    else:
        returncode, tail = _stream(command, env, log, echo=not quiet)
    if returncode != 0:
        message = f"{' '.join(script)} failed (exit code {returncode})"
        if tail is not None:
            where = f"; all of it in {log}" if log is not None else ""
            message += f"; its last lines{where}:\n" + "".join(tail).rstrip("\n")
        raise RuntimeError(message)
    return time.perf_counter() - start


def _stream(command: list[str], env: dict, log: Path | None, echo: bool) -> tuple[int, deque]:
    """Run ``command`` with its stdout and stderr read together, line by line: every line appended to ``log``
    (when given), the progress lines echoed to the terminal (``echo``). Returns the exit code and the last
    :data:`TAIL_LINES` lines."""
    tail: deque = deque(maxlen=TAIL_LINES)
    with (open(log, "a", encoding="utf-8") if log is not None else contextlib.nullcontext()) as sink, \
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             errors="replace", bufsize=1) as child:
        for line in child.stdout:
            line = line if line.endswith("\n") else line + "\n"
            tail.append(line)
            if sink is not None:
                sink.write(line)
                sink.flush()  # the log follows the run (tail -f)
            if echo and PROGRESS_LINE.match(line):
                print(line, end="", flush=True)
    return child.returncode, tail


def _body(path: Path) -> str:
    text = path.read_text()
    match = re.search(r"<body[^>]*>(.*)</body>", text, re.S)
    return match.group(1) if match else text


def _cell(value: float | None, digits: int) -> str:
    return "\u2014" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


SUMMARY_COLUMNS = (("dataset", None, None), ("pixel AP", "pixel_ap", 3), ("sample AP", "sample_ap", 3),
                   ("seconds per case", "seconds_per_case", 1))


def _summary_rows(summary: dict) -> list[list[str]]:
    return [[dataset] + [_cell(values[key], digits) for _, key, digits in SUMMARY_COLUMNS[1:]]
            for dataset, values in summary.items()]


def _summary_table(summary: dict) -> str:
    """The demo's numbers as an HTML table: AP of both tasks and the seconds per case, per dataset."""
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _, _ in SUMMARY_COLUMNS)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                   for row in _summary_rows(summary))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def summary_text(summary: dict) -> str:
    """The same numbers as a plain-text table for the terminal (the dataset left-aligned, the numbers right)."""
    rows = [[name for name, _, _ in SUMMARY_COLUMNS], *_summary_rows(summary)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(SUMMARY_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(row, widths))).rstrip()
                     for row in rows)


def run_demo(output_dir: str | Path = "outputs/demo", size: int = DEMO_SIZE, cases: int = 6, seed: int = 0) -> Path:
    """Write, score, evaluate and report the toy sets; prints the progress and, at the end, the numbers as a
    table. Returns the index page (``<output_dir>/report.html``)."""
    output = Path(output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    log = output / LOG_NAME
    log.write_text("")  # this demo's runs, each appended below
    print(f"demo: the run scripts' full output (their commands, MONAI's summaries) goes to {log}", flush=True)
    start = time.perf_counter()
    summary, sections = {}, []
    for dataset in DATASETS:
        write_toy_dataset(output / "data", dataset, n_train=0, n_toy=cases, size=size, seed=seed)
        data_dir = output / "data" / dataset
        predictions = output / "predictions" / dataset
        print(f"demo: {dataset}: scoring {cases} toy cases (docker/run_mood.sh both {dataset})", flush=True)
        with log.open("a", encoding="utf-8") as sink:
            sink.write(f"=== demo: {dataset}: run_mood.sh both {dataset} {data_dir / 'toy'} {predictions}\n")
        # the worklist too (scores.csv): the report lists the cases by score and flags them at the operating point
        seconds = run_script("both", dataset, data_dir / "toy", predictions, worklist=True, log=log)
        scores = {mode: evaluate(data_dir, predictions, mode) for mode in ("pixel", "sample")}
        report = write_report(data_dir, pixel_dir=predictions, sample_dir=predictions,
                              output_dir=output / "report" / dataset, title=f"{dataset}: toy test set",
                              seconds_per_case=seconds / cases)
        summary[dataset] = {
            "pixel_ap": scores["pixel"]["average_precision"], "sample_ap": scores["sample"]["average_precision"],
            "seconds_per_case": seconds / cases,
        }
        # the report's own heading names the dataset; its stylesheet is the index page's, once, in the head
        sections.append(f"<section>{re.sub(r'<style>.*?</style>', '', _body(report), flags=re.S)}</section>")
    total = time.perf_counter() - start
    (output / "demo.json").write_text(json.dumps({**summary, "total_seconds": total}, indent=1) + "\n")
    index = output / "report.html"
    index.write_text(
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>MOOD anomaly bundle demo</title><style>{STYLE}</style></head><body>"
        "<div class='mood-report'><p>Toy MOOD test cases (anomaly kinds the training never made), scored for both "
        f"MOOD tasks in one pass with the shipped weights in {total:.0f} s.</p>" + _summary_table(summary) + "</div>"
        + "".join(sections) + "</body></html>\n"
    )
    print(summary_text(summary), flush=True)
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
