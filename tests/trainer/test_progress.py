"""The rich progress bar fits the terminal: at 80 columns the step count, the reward, the lag, the step time
and both clocks are shown whole (rich cuts a column that does not fit with '…'); from 110 columns on it also
shows the step's reward. Rendered into a fixed-width rich Console (no terminal needed)."""
from __future__ import annotations

import io
import re

import pytest

pytest.importorskip("rich")


def _render(width: int, total: int = 1000, steps: int = 999) -> str:
    """The bar's line after `steps` updates, as a terminal of `width` columns shows it."""
    from rich.console import Console

    from vespo_trainer.metrics_log import Progress

    live = Console(width=width, file=io.StringIO(), force_terminal=True)  # the terminal the bar sizes itself to
    p = Progress("rich", total, 0, 10, console=live)
    try:
        for step in range(steps):
            p.update(step, {"reward/mean": 0.75, "staleness/mean": 1.5, "time/step_s": 12.34})
        shot = Console(width=width, file=io.StringIO(), record=True, color_system=None)
        shot.print(p._bar.make_tasks_table(p._bar.tasks))
    finally:
        p.close()
    return shot.export_text().rstrip("\n")


@pytest.mark.parametrize("width", [80, 100])
def test_the_bar_fits_80_columns(width):
    line = _render(width)
    assert "…" not in line, line
    assert f"{999}/{1000}" in line and "reward 0.750" in line and "lag 1.50" in line and "12.34 s/step" in line, line
    assert len(re.findall(r"\d+:\d\d:\d\d", line)) == 2, line  # elapsed and remaining, whole
    assert len(line.rstrip()) <= width


def test_a_wide_terminal_also_shows_the_step_reward():
    line = _render(140)
    assert "…" not in line and "0.750 (last 20: 0.750)" in line and "vespo train" in line, line


def test_the_check_can_fail(monkeypatch):
    """The wide layout at 80 columns is cut (what users saw: `9…`, `0:0…`): the checks above would see it."""
    from vespo_trainer.metrics_log import Progress

    monkeypatch.setattr(Progress, "WIDE", 0)
    line = _render(80)
    assert "…" in line or len(re.findall(r"\d+:\d\d:\d\d", line)) < 2, line
