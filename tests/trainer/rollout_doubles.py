"""Test doubles for the rollout workers: an HF rollout worker that stops answering on purpose."""
import time

from vespo_trainer.rollout.hf import HFRolloutWorker

HANG_FROM_CALL = 1  # sync: the step; async: the generate call counter


class HangingRolloutWorker(HFRolloutWorker):
    """Answers its first generate calls, then sleeps (a hung engine) until it is killed."""

    def generate(self, prompts, step, uid_base, **kw):
        if step >= HANG_FROM_CALL:
            time.sleep(3600)
        return super().generate(prompts, step, uid_base, **kw)
