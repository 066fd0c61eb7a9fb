"""Check a report (:mod:`tools.report`) in a real browser: headless Chromium screenshots and layout measurements.

Run (``make report-check [OUT=report]``)::

    PYTHONPATH=bundle:. python -m tools.report_screenshot --report OUT/report.html [--output_dir DIR] \\
        [--width 1400] [--height 3000] [--chromium PATH]

Two Chromium runs on the page (``chromium --headless --screenshot`` and ``--dump-dom``, ``--window-size``
WIDTHxHEIGHT): a screenshot ``DIR/report_<width>.png`` of the top of the page, and measurements taken by the
browser's own layout on a copy of the page with a small script appended (the report itself carries none): the
page's scroll width against the window, and the drawn and decoded size of every image. Problems reported (exit
status 1): a blank screenshot, a page wider than the window (horizontal scrolling), an image that did not
decode, a slice drawn narrower than :data:`tools.report.MIN_PANEL_WIDTH` or at another size than its own.
Chromium is looked up as ``$CHROMIUM``, ``chromium``, ``chromium-browser``, ``google-chrome``; it runs with
``--no-sandbox`` (a local file this checkout wrote, and root in containers) and a throw-away profile.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from tools.report import MIN_PANEL_WIDTH

__all__ = ["check_report", "find_chromium", "measure", "screenshot"]

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MARK = "report-measurements"
# appended to a copy of the page: the browser's own numbers, written into the DOM for --dump-dom
MEASURE_SCRIPT = """<script>
window.addEventListener('load', function () {
  var d = document.documentElement, out = {scrollWidth: d.scrollWidth, clientWidth: d.clientWidth,
    innerWidth: window.innerWidth, images: []};
  document.querySelectorAll('img').forEach(function (img) {
    var r = img.getBoundingClientRect();
    out.images.push({alt: img.alt, width: r.width, height: r.height, naturalWidth: img.naturalWidth,
      naturalHeight: img.naturalHeight, complete: img.complete, slice: !!img.closest('.slice')});
  });
  var pre = document.createElement('pre'); pre.id = 'MARK'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>""".replace("MARK", MARK)


def find_chromium() -> str | None:
    """The Chromium binary: ``$CHROMIUM`` or the first of :data:`CANDIDATES` on PATH; None if there is none."""
    env = os.environ.get("CHROMIUM")
    if env and shutil.which(env):
        return shutil.which(env)
    return next((shutil.which(name) for name in CANDIDATES if shutil.which(name)), None)


def _run(chromium: str | None, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found (set CHROMIUM or install chromium)")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
                   "--run-all-compositor-stages-before-draw", "--virtual-time-budget=10000", *args]
        env = dict(os.environ, HOME=profile)
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def screenshot(html_path: str | os.PathLike, png_path: str | os.PathLike, width: int = 1400, height: int = 3000,
               chromium: str | None = None, timeout: float = 120.0) -> Path:
    """A ``width`` x ``height`` screenshot of the top of the page at ``png_path``."""
    png_path = Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.unlink(missing_ok=True)
    result = _run(chromium, ["--hide-scrollbars", f"--window-size={width},{height}", f"--screenshot={png_path}",
                             Path(html_path).resolve().as_uri()], timeout)
    if not png_path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot ({result.returncode}): {result.stderr[-1500:]}")
    return png_path


def measure(html_path: str | os.PathLike, width: int = 1400, height: int = 3000, chromium: str | None = None,
            timeout: float = 120.0) -> dict:
    """The browser's layout numbers for the page at that window size: ``scrollWidth``, ``clientWidth``,
    ``innerWidth`` and, per image, its drawn ``width`` / ``height``, ``naturalWidth`` / ``naturalHeight``
    (0 when it did not decode) and whether it is a slice."""
    html_path = Path(html_path)
    text = html_path.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="report-measure-") as tmp:
        copy = Path(tmp) / "page.html"
        copy.write_text(text.replace("</body>", MEASURE_SCRIPT + "</body>", 1) if "</body>" in text
                        else text + MEASURE_SCRIPT, encoding="utf-8")
        result = _run(chromium, [f"--window-size={width},{height}", "--dump-dom", copy.as_uri()], timeout)
    match = re.search(rf"<pre id=\"{MARK}\">(.*?)</pre>", result.stdout, re.S)
    if not match:
        raise RuntimeError(f"no measurements in chromium's DOM ({result.returncode}): {result.stderr[-1500:]}")
    return json.loads(html.unescape(match.group(1)))


def blank_fraction(png_path: str | os.PathLike) -> float:
    """The fraction of the screenshot's pixels equal to its most common colour (1.0: a blank page)."""
    rgb = np.asarray(Image.open(png_path).convert("RGB"), dtype=np.uint8).reshape(-1, 3)
    packed = (rgb[:, 0].astype(np.int64) << 16) | (rgb[:, 1].astype(np.int64) << 8) | rgb[:, 2]
    return float(np.bincount(np.unique(packed, return_inverse=True)[1]).max() / packed.size)


def check_report(html_path: str | os.PathLike, output_dir: str | os.PathLike | None = None, width: int = 1400,
                 height: int = 3000, chromium: str | None = None) -> dict:
    """Screenshot and measure the page; returns ``{"screenshot", "measurements", "blank_fraction",
    "problems"}`` where ``problems`` lists what is wrong (empty when the page is fine)."""
    html_path = Path(html_path)
    output_dir = Path(output_dir) if output_dir is not None else html_path.parent
    png = screenshot(html_path, output_dir / f"report_{width}.png", width, height, chromium)
    numbers = measure(html_path, width, height, chromium)
    problems = []
    blank = blank_fraction(png)
    if blank > 0.985:
        problems.append(f"the screenshot is blank ({blank:.1%} of it one colour)")
    if numbers["scrollWidth"] > numbers["clientWidth"]:
        problems.append(f"the page is {numbers['scrollWidth']} px wide in a {numbers['clientWidth']} px window "
                        "(horizontal scrolling)")
    slices = [i for i in numbers["images"] if i["slice"]]
    for image in numbers["images"]:
        if not image["naturalWidth"]:
            problems.append(f"image {image['alt']!r} did not decode")
    for image in slices:
        if image["width"] < MIN_PANEL_WIDTH - 0.5:
            problems.append(f"slice {image['alt']!r} drawn {image['width']:.0f} px wide (< {MIN_PANEL_WIDTH})")
        if image["naturalWidth"] and abs(image["width"] - image["naturalWidth"]) > 0.5:
            problems.append(f"slice {image['alt']!r} drawn at {image['width']:.0f} px, rendered at "
                            f"{image['naturalWidth']} px")
    return {"screenshot": str(png), "measurements": numbers, "blank_fraction": blank, "n_slices": len(slices),
            "problems": problems}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", default="report/report.html", help="the report's HTML")
    parser.add_argument("--output_dir", default=None, help="where the screenshot goes (default: beside the report)")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--chromium", default=None)
    args = parser.parse_args(argv)
    if not Path(args.report).is_file():
        print(f"report-check: report {args.report} does not exist (make report first)")
        raise SystemExit(2)
    if (args.chromium or find_chromium()) is None:
        print("report-check: no Chromium found (apt-get install -y chromium, or set CHROMIUM)")
        raise SystemExit(2)
    result = check_report(args.report, args.output_dir, args.width, args.height, args.chromium)
    m = result["measurements"]
    print(f"page {m['scrollWidth']} px wide in a {m['clientWidth']} px window; {len(m['images'])} images, "
          f"{result['n_slices']} slices; screenshot {result['blank_fraction']:.1%} background")
    for problem in result["problems"]:
        print(f"problem: {problem}")
    print(f"screenshot: {result['screenshot']}")
    if result["problems"]:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
