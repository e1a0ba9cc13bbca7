"""Run outputs: metrics.jsonl (one JSON object per step), provenance.jsonl, TensorBoard, progress display."""
from __future__ import annotations

import json
import math
import os
import sys
from collections import deque
from typing import Dict, List, Optional

METRICS_FILE = "metrics.jsonl"
PROVENANCE_FILE = "provenance.jsonl"


def plural(n, word: str, words: str = "") -> str:
    """'1 thread', '2 threads' (words: an irregular plural)."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {words or word + 's'}"


def _truncate_jsonl(path: str, keep_through: int) -> None:
    """Keep only the records of steps 1..keep_through (the checkpoint's; a resumed run rewrites the rest)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= keep_through]
    with open(path, "w") as f:
        f.writelines(lines)


def _append_line(path: str, line: str) -> None:
    """One record, appended with a single write (O_APPEND), so a reader of the growing file never meets
    two records interleaved, and at most the last line unfinished."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        data = (line + "\n").encode()
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON; a non-finite value shows up as null
    return v


class RunLog:
    """Appends one record per step; on resume, drops records past the checkpoint first.

    Steps are numbered 1..total_steps, as the progress bar and the checkpoints count them: the record of
    step s is written when s steps are done (checkpoints/step_{s:06d} holds the state after it)."""

    def __init__(self, run_dir: str, start_step: int, tensorboard: bool, provenance: bool):
        self.run_dir = run_dir
        self.metrics_path = os.path.join(run_dir, METRICS_FILE)
        self.prov_path = os.path.join(run_dir, PROVENANCE_FILE) if provenance else None
        for path in (self.metrics_path, self.prov_path):
            if path:
                _truncate_jsonl(path, start_step)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_step + 1 if start_step
                                    else None)

    def log(self, step: int, metrics: Dict[str, float], lags: Optional[List[int]] = None,
            provenance: Optional[dict] = None) -> None:
        """The record of step `step` (1-based: the step just completed)."""
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        _append_line(self.metrics_path, json.dumps(record))
        if self.prov_path and provenance is not None:
            _append_line(self.prov_path, json.dumps({"step": step, **provenance}))
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            if lags:
                import numpy as np

                self.tb.add_histogram("staleness/lag", np.asarray(lags), step, bins=np.arange(-0.5, max(lags) + 1.5))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str) -> List[dict]:
    with open(os.path.join(run_dir, METRICS_FILE)) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


class Progress:
    """A rich progress bar with live reward on a TTY; plain lines otherwise (or nothing).

    The bar fits the terminal: from WIDE columns on it shows the step's reward and the running mean, below
    (an 80-column terminal) the running mean alone, so the step count and the times are never cut."""

    WIDE = 110

    def __init__(self, mode: str, total: int, start: int, log_every: int, console=None):
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode, self.total, self.log_every = mode, total, log_every
        self._recent = deque(maxlen=max(20, log_every))  # per-step reward is noisy: show a running mean too
        self._bar = None
        if mode == "rich":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            console = console or Console()
            self._wide = console.width >= self.WIDE
            if self._wide:
                cols = [TextColumn("[bold]vespo train"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("reward [bold green]{task.fields[reward]}"), TextColumn("lag {task.fields[lag]}"),
                        TextColumn("{task.fields[step_s]} s/step"), TimeElapsedColumn(), TimeRemainingColumn()]
            else:  # 80 columns: 10 + 9 (1000/1000) + 12 + 8 + 11 + 7 + 7, and the spaces
                cols = [BarColumn(bar_width=10), MofNCompleteColumn(),
                        TextColumn("reward [bold green]{task.fields[reward]}"), TextColumn("lag {task.fields[lag]}"),
                        TextColumn("{task.fields[step_s]} s/step"), TimeElapsedColumn(), TimeRemainingColumn()]
            self._bar = RichProgress(*cols, console=console)
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, completed=start, reward="-", lag="-", step_s="-")

    def start_at(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def update(self, step: int, m: Dict[str, float]) -> None:
        reward, lag, dt = m.get("reward/mean", float("nan")), m.get("staleness/mean", float("nan")), \
            m.get("time/step_s", float("nan"))
        self._recent.append(reward)
        mean = sum(self._recent) / len(self._recent)
        shown = f"{reward:.3f} (last {len(self._recent)}: {mean:.3f})"
        if self._bar is not None:
            self._bar.update(self._task, completed=step + 1, reward=shown if self._wide else f"{mean:.3f}",
                             lag=f"{lag:.2f}", step_s=f"{dt:.2f}")
        elif self.mode == "plain" and ((step + 1) % self.log_every == 0 or step + 1 == self.total or step == 0):
            print(f"step {step + 1:>5}/{self.total}  reward {shown}  "
                  f"loss {m.get('actor/loss', float('nan')):+.4f}  "
                  f"phi {m.get('vespo/phi_mean', float('nan')):.3f}  lag mean {lag:.2f} max "
                  f"{m.get('staleness/max', float('nan')):.0f}  {dt:.2f} s/step", flush=True)

    def print(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.console.print(msg)
        elif self.mode != "none":
            print(msg, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
