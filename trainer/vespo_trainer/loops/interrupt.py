"""Ctrl-C: the first one asks the driver loop to checkpoint and stop at its next safe point; a second
one stops at once (KeyboardInterrupt: the actors are killed, nothing more is saved). Before the first
step (loading, Ray, the actors, the warm-up) there is nothing to save: the first Ctrl-C then stops the
run as soon as the start-up reaches a point where it can stop cleanly, and says so.

    with GracefulInterrupt() as stop:
        ...start...
        if stop.requested:
            raise Interrupted(start_step, run_dir, saved=False)
        stop.started = True
        for step in ...:
            ...
            if stop.requested:
                save(); raise Interrupted(step, run_dir)
"""
from __future__ import annotations

import signal
import sys
import threading


class Interrupted(Exception):
    """The run stopped on Ctrl-C: after saving a checkpoint at `step` (resume with trainer.resume=true), or
    (saved=False) before its first step, with nothing trained and nothing saved."""

    def __init__(self, step: int, run_dir: str, saved: bool = True):
        super().__init__(f"interrupted at step {step}; checkpoint saved in {run_dir}" if saved else
                         "interrupted before the first step: nothing was trained and no checkpoint written now")
        self.step, self.run_dir, self.saved = step, run_dir, saved


class TrainingAborted(RuntimeError):
    """A fatal failure with a message for the user (e.g. the learner died); resume may continue it."""


def aborted(what: str, exc: BaseException, run_dir: str) -> TrainingAborted:
    """The TrainingAborted for an actor failure (RayActorError, a RayTaskError such as LearnerFailed, or
    runtime.ActorTimeout), with what is true of the run's checkpoints."""
    from ..checkpoint import latest
    from ..errors import VespoUserError

    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    try:
        tag = latest(run_dir)
    except VespoUserError:  # an unreadable `latest` file: no checkpoint to offer
        tag = None
    hint = (f"the last checkpoint is {run_dir}/checkpoints/{tag}: continue with trainer.resume=true "
            f"trainer.output_dir={run_dir}" if tag else
            "no checkpoint was written yet: run the same command again (with another trainer.output_dir) to start over")
    return TrainingAborted(f"{what} ({type(exc).__name__}: {first}); {hint}")


class GracefulInterrupt:
    def __init__(self, notify=None):
        self.requested = False
        self.started = False  # set by the loop when its first step begins: from then on a stop saves
        self._notify = notify or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._old = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.requested = True
        if self.started:
            self._notify("Ctrl-C: saving a checkpoint at the next step boundary, then stopping "
                         "(press Ctrl-C again to stop at once without saving)")
        else:
            self._notify("Ctrl-C before the first step: nothing to save; stopping as soon as the start-up can "
                         "stop cleanly (press Ctrl-C again to stop at once)")

    def __enter__(self) -> "GracefulInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None
