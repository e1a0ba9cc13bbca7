"""`train(cfg)`: the mode dispatcher. Checks what can be checked before any actor starts, starts Ray and
the actors, runs the sync or the async loop, and turns an actor failure or a hung actor (runtime.ActorTimeout)
into TrainingAborted (or, when an actor raised a VespoUserError, that error)."""
from __future__ import annotations

import os

from ..cluster import ray_session, start_actors, stop_actors
from ..config import Config, to_yaml
from ..data.tasks import load_prompts
from ..errors import ConfigError, VespoUserError
from ..learner.group import LearnerFailed
from ..metrics_log import Progress
from ..reward.pool import resolve_fn, reward_spec
from ..runtime import ActorTimeout, unwrap_ray_error
from ..tokenizer import make_tokenizer
from .async_driver import async_loop
from .common import resolve_run_dir
from .interrupt import GracefulInterrupt, Interrupted, aborted
from .sync import sync_loop

LOOPS = {"sync": sync_loop, "async": async_loop}


def train(cfg: Config) -> str:
    """Run (or resume) a training run in cfg.trainer.mode; returns the run directory.

    Raises Interrupted after a Ctrl-C (a checkpoint was saved; or, before the first step, none), TrainingAborted
    on a fatal actor failure or an actor that did not answer within trainer.actor_timeout_s.
    """
    run_dir = resolve_run_dir(cfg)
    progress = Progress(cfg.trainer.progress, cfg.trainer.total_steps, 0, cfg.trainer.log_every)
    with GracefulInterrupt(progress.print) as stop:  # from the start: a Ctrl-C while loading is answered too
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
        try:  # the tokenizer and the prompts load here, so a bad model.path or data file fails before any actor
            tok = make_tokenizer(cfg)
            prompts = load_prompts(cfg, tok, log=progress.print)
            resolve_fn(reward_spec(cfg))  # importable here (the reward workers import it again)
        except VespoUserError:
            progress.close()
            raise
        except ValueError as exc:  # e.g. a prompt the built-in tokenizer cannot encode
            progress.close()
            raise ConfigError(str(exc)) from None
        loop = LOOPS[cfg.trainer.mode]
        with ray_session(cfg):
            import ray

            if stop.requested:  # Ctrl-C while loading or starting Ray: start no actor
                progress.close()
                raise Interrupted(0, run_dir, saved=False)
            try:
                actors = start_actors(cfg)
            except BaseException:  # e.g. too few CPUs/GPUs for the actors, a missing backend (exit code 2)
                progress.close()
                raise
            try:
                loop(cfg, run_dir, actors, progress, stop, tok, prompts)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                cause = unwrap_ray_error(exc)
                if isinstance(cause, VespoUserError):
                    raise cause from None
                learner = isinstance(cause, LearnerFailed)
                raise aborted("the learner died" if learner else "an actor failed", cause, run_dir) from None
            except ActorTimeout as exc:  # stop_actors (below) kills the hung actor with the others
                raise aborted("an actor stopped answering", exc, run_dir) from None
            finally:
                progress.close()
                stop_actors(actors)
    return run_dir
