"""Progress of an inference run: one line per case with its stage timings, a summary, and the exit code when a case
failed."""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from scripts.io.keys import ERROR, NAME

# the exit code of an inference run in which some case failed (every other case was still scored)
FAILED_CASES_EXIT_CODE = 3


# the stages of a case in the order they run, as the progress lines name them
STAGES = ("load", "preprocess", "network", "summarise", "inverse", "write")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min {seconds % 60:02d} s"


class ProgressReporter:
    """Prints one line per case (name, seconds, the score and whether it is flagged, where the time went: the
    seconds of each stage, from the case's ``timings`` and the network's pass; or why it failed; and the time left
    at the mean pace so far) and a summary line. On a terminal a tqdm bar over the cases also shows the case being
    scored and the time left. Loading runs in the background during the previous case, so the stages can add up
    to more than the case's own seconds."""

    def __init__(self, total: int | None = None) -> None:
        self.total = total
        self.bar = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._case_start)  # includes waiting for the loader
        engine.add_event_handler(Events.ITERATION_STARTED, self._network_start)
        if engine.has_registered_events(IterationEvents.FORWARD_COMPLETED):  # MONAI engines fire it
            engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._network_done)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._case_done)
        engine.add_event_handler(Events.COMPLETED, self._summary)
        engine.add_event_handler(Events.TERMINATE, self._close_bar)

    def _network_start(self, engine: Engine) -> None:
        self.network_t0, self.network_seconds = time.perf_counter(), None
        if self.bar is not None:
            batch = engine.state.batch  # the iteration's cases (the inference engine's), or a collated batch
            names = batch.get(NAME) if isinstance(batch, Mapping) else [c.get(NAME) for c in batch or []]
            self.bar.set_postfix_str(", ".join(filter(None, names)) if names else "", refresh=True)

    def _network_done(self, engine: Engine) -> None:
        device = getattr(engine.state, "device", None)
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)  # the pass is asynchronous: count it here, not in the first copy
        self.network_seconds = time.perf_counter() - self.network_t0

    def _stages(self, item: Mapping) -> str:
        timings = {k: float(v) for k, v in (item.get("timings") or {}).items()}
        if self.network_seconds is not None:
            timings["network"] = self.network_seconds
        named = [f"{stage} {timings.pop(stage):.1f}" for stage in STAGES if stage in timings]
        named += [f"{stage} {seconds:.1f}" for stage, seconds in sorted(timings.items())]
        return f" ({', '.join(named)} s)" if named else ""

    def _start(self, engine: Engine) -> None:
        import sys

        from tqdm import tqdm

        self.done, self.failed, self.seconds, self.t0 = 0, [], [], time.perf_counter()
        self.total = self.total or len(engine.data_loader)
        # a bar only on a terminal: in a log file its redraws would be noise (the lines say the same)
        self.bar = tqdm(total=self.total, unit="scan", desc="scoring", leave=False, file=sys.stderr,
                        disable=not sys.stderr.isatty(), dynamic_ncols=True)

    def _case_start(self, engine: Engine) -> None:
        self.case_t0 = time.perf_counter()

    def _print(self, line: str) -> None:
        import sys

        from tqdm import tqdm

        tqdm.write(line, file=sys.stdout)  # above the bar, which is redrawn below it
        sys.stdout.flush()  # a line per case as it ends, also into a pipe or a log file
        if self.bar is not None:
            self.bar.update(1)

    def _time_left(self, index: int) -> str:
        remaining = self.total - index
        if remaining <= 0:
            return ""
        return f"; {_duration((time.perf_counter() - self.t0) / index * remaining)} left"

    def _case_done(self, engine: Engine) -> None:
        elapsed = time.perf_counter() - self.case_t0
        batch, output = engine.state.batch, engine.state.output
        batch, output = (batch, output) if isinstance(batch, list) else ([batch], [output])
        for part, result in zip(batch, output):
            item = {**part, **(result if isinstance(result, Mapping) else {})}
            index = self.done + len(self.failed) + 1
            if item.get(ERROR):
                self.failed.append(item[NAME])
                self._print(f"[{index}/{self.total}] {item[NAME]}: FAILED: {item[ERROR]}{self._time_left(index)}")
            else:
                self.done += 1
                self.seconds.append(elapsed)
                extra = f" score {item['score']:.4f}" if "score" in item else ""
                extra += " FLAGGED" if item.get("flagged") else ""
                self._print(f"[{index}/{self.total}] {item[NAME]}: {elapsed:.1f} s{extra}{self._stages(item)}"
                            f"{self._time_left(index)}")

    def _close_bar(self, engine: Engine, *args) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _summary(self, engine: Engine) -> None:
        self._close_bar(engine)
        per_case = sum(self.seconds) / len(self.seconds) if self.seconds else float("nan")
        print(f"summary: {self.done} done, {len(self.failed)} failed, {per_case:.1f} s per case, "
              f"{time.perf_counter() - self.t0:.1f} s in all" + (f"; failed: {self.failed}" if self.failed else ""),
              flush=True)


def exit_if_any_failed(reporter: ProgressReporter) -> None:
    """End the run with :data:`FAILED_CASES_EXIT_CODE` when any case failed, so a caller can tell a complete run
    from one that scored only some cases (the MOOD run scripts then check that every case has its output)."""
    if reporter.failed:
        raise SystemExit(FAILED_CASES_EXIT_CODE)
