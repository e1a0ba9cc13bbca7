"""The trainer's GPU path in one process, without Ray: a CUDA rollout and DeepSpeed learner steps.

The classes the Ray actors wrap are called directly (no actor, no object store):

  1. rollout.hf.HFRolloutWorker(cfg, 0): the tiny built-in model (config defaults + examples/configs/
     tiny.yaml sizes) on the device; HF `generate` of a few arith prompts, behaviour log-probs by
     vespo_ext.token_logprobs on the sampled logits;
  2. learner.rank.Learner(cfg): a DeepSpeed engine in a world of 1 (NCCL on cuda, gloo on cpu; the
     Learner's own setup: torch.distributed through a tcp://127.0.0.1 rendezvous), a format warm-up
     step and `train_batch` on the rollout batch (GRPO advantages of the arith reward), losses printed;
  3. the weights back to the rollout model through weight_sync's own bucket packing (publish /
     load_buckets) with an in-process channel instead of Ray's object store, and a second rollout.

Then the same batch once more through a second learner with actor.fused_linear=true (the loss from
the backbone's hidden states + the head's weight, vespo_ext.linear_policy_loss): its first mini-batch
loss must equal the first learner's (same seed, same weights, same batch).

What is NOT exercised here: the Ray actors, the reward process pool (the arith reward is called
in-process), HFRolloutWorker.update_weights' Ray transport (load_buckets is called with the local channel).

    python benchmarks/gpu/trainer_gpu_check.py --device cuda     # on the GPU machine (run_gpu.sh)
    python benchmarks/gpu/trainer_gpu_check.py --device cpu      # here: gloo, seconds

Needs torch, transformers, deepspeed, omegaconf (run_gpu.sh installs the last two from
benchmarks/wheels on the GPU machine). Prints "trainer_gpu_check: ok" and exits 0 when every check passed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TINY = os.path.join(ROOT, "examples", "configs", "tiny.yaml")


class LocalChannel:
    """weight_sync's channel interface in one process: the packed bucket itself is the handle."""

    @staticmethod
    def send(bucket):
        from vespo_trainer.weight_sync import pack_bucket

        return pack_bucket(bucket)

    @staticmethod
    def receive(handles):
        from vespo_trainer.weight_sync import unpack_bucket

        for packed in handles:
            yield from unpack_bucket(packed)


def log(msg: str) -> None:
    print(f"[trainer_gpu_check] {msg}", flush=True)


def make_cfg(device: str, fused_linear: str, extra):
    from vespo_trainer.config import load_config

    return load_config(TINY, [f"trainer.device={device}", "trainer.num_threads=2", "trainer.tensorboard=false",
                              "data.train_batch_size=4", "actor.ppo_mini_batch_size=2", "rollout.n=4",
                              "rollout.max_new_tokens=3", f"actor.fused_linear={fused_linear}", *extra])


def rollout_batch(worker, cfg, prompts, step: int):
    """generate -> merged batch with arith rewards and GRPO advantages (what sync_loop does, minus Ray)."""
    import torch

    from vespo_trainer.batch import group_advantages, merge_rollouts
    from vespo_trainer.data.arith import arith_reward

    n = cfg.rollout.n
    t0 = time.perf_counter()
    part = worker.generate(prompts, step, step * len(prompts) * n)
    gen_s = time.perf_counter() - t0
    batch = merge_rollouts([part], worker.tok.pad_token_id)
    rewards = torch.tensor([arith_reward(p, t, g) for p, t, g in
                            zip(batch["prompts"], batch["texts"], batch["ground_truths"])], dtype=torch.float32)
    batch["advantages"] = group_advantages(rewards, n, cfg.algorithm.adv_eps, cfg.algorithm.norm_adv_by_std)
    if not batch["advantages"].abs().sum():
        # an untrained tiny model scores 0 on every response: GRPO advantages are all 0 and so would be the loss
        # and the gradients; seeded N(0, 1) advantages instead, so the steps check something
        g = torch.Generator().manual_seed(1000 + step)
        batch["advantages"] = torch.randn(batch["advantages"].shape, generator=g)
        log(f"rollout step {step}: all GRPO advantages are 0 (rewards {rewards.tolist()}): seeded N(0, 1) ones instead")
    lp = batch["old_logp"][batch["response_mask"]]
    log(f"rollout step {step}: {batch['responses'].shape[0]} responses x {batch['responses'].shape[1]} tokens "
        f"in {gen_s:.2f}s, reward mean {float(rewards.mean()):.3f}, behaviour logp mean {float(lp.mean()):.4f} "
        f"(min {float(lp.min()):.3f}), texts {batch['texts'][:4]}")
    if not torch.isfinite(lp).all() or (lp > 1e-6).any():
        raise AssertionError(f"behaviour log-probs must be finite and <= 0: {lp}")
    return batch, rewards


def sync_weights(learner, worker) -> float:
    """Learner -> rollout model through weight_sync.publish / load_buckets (local channel); MiB moved."""
    from vespo_trainer.weight_sync import load_buckets, publish

    handles = publish(learner.engine.module, learner.cfg.weight_sync.bucket_mb, channel=LocalChannel)
    nbytes = load_buckets(worker.model, handles, channel=LocalChannel)
    worker.version = learner.version
    return nbytes / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--steps", type=int, default=2, help="rollout + train_batch rounds (each: 2 optimizer steps)")
    ap.add_argument("--no-fused-linear-check", action="store_true", help="skip the second learner")
    ap.add_argument("--json", default=None, help="write the losses and timings here")
    ap.add_argument("overrides", nargs="*", help="extra config overrides (key=value)")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        log("FAIL: --device cuda but torch sees no GPU")
        return 2
    import random

    import vespo_ext
    from vespo_trainer.batch import learner_view
    from vespo_trainer.data.arith import task_prompts, warmup_texts
    from vespo_trainer.data.prompt import PromptStream
    from vespo_trainer.learner.rank import Learner
    from vespo_trainer.rollout.base import backend_class

    log(f"torch {torch.__version__}, vespo_ext {vespo_ext.__version__} from {os.path.dirname(vespo_ext.__file__)}, "
        f"kernels on {args.device}: {vespo_ext.has_kernels(torch.device(args.device))}"
        + (f", GPU {torch.cuda.get_device_name()}" if args.device == "cuda" else ""))
    cfg = make_cfg(args.device, "false", args.overrides)
    report = {"device": args.device, "steps": []}

    # 1. rollout worker (the class rollout.backend=hf names) and the learner, world of 1
    t0 = time.perf_counter()
    worker = backend_class(cfg.rollout.backend)(cfg, 0)
    log(f"rollout worker {type(worker).__name__} on {worker.device} ({time.perf_counter() - t0:.1f}s)")
    t0 = time.perf_counter()
    learner = Learner(cfg)
    info = learner.info()
    log(f"learner {info} ({time.perf_counter() - t0:.1f}s, backend "
        f"{torch.distributed.get_backend() if torch.distributed.is_initialized() else None})")
    if info["device"] != str(torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")):
        raise AssertionError(f"learner on {info['device']}, asked for {args.device}")
    if args.device == "cuda" and torch.distributed.get_backend() != "nccl":
        raise AssertionError(f"world of 1 on cuda should use NCCL, got {torch.distributed.get_backend()}")
    report["learner_info"] = {k: v for k, v in info.items() if k != "pid"}

    # format warm-up: the supervised path (cross-entropy on the response logits), 1 step
    rng = random.Random("trainer_gpu_check/warmup")
    w = learner.warmup([warmup_texts(task_prompts(cfg.task), cfg.task.warmup_batch_size, rng)])
    log(f"warm-up: {w}")
    mib = sync_weights(learner, worker)
    log(f"weights -> rollout model: {mib:.2f} MiB (weight_sync.publish / load_buckets, local channel)")
    before = {n: p.detach().float().cpu().clone() for n, p in worker.model.named_parameters()}

    # 2. rollout + train_batch rounds
    stream = PromptStream(task_prompts(cfg.task), cfg.trainer.seed, cfg.data.shuffle)
    first_batch = None
    for step in range(args.steps):
        prompts = stream.next_batch(cfg.data.train_batch_size)
        batch, rewards = rollout_batch(worker, cfg, prompts, step)
        if first_batch is None:
            first_batch = batch
        t0 = time.perf_counter()
        out = learner.train_batch(learner_view(batch))
        train_s = time.perf_counter() - t0
        losses = [mb["loss"] for mb in out["parts"]["minibatches"]]
        norms = [mb["grad_norm"] for mb in out["parts"]["minibatches"]]
        log(f"train_batch step {step}: mini-batch losses {losses}, grad norms {norms}, version {learner.version}, "
            f"{train_s:.2f}s")
        if not all(map(lambda v: v == v and abs(v) < 1e6, losses)):
            raise AssertionError(f"non-finite loss: {losses}")
        mib = sync_weights(learner, worker)
        report["steps"].append({"losses": losses, "grad_norms": norms, "train_s": train_s,
                                "reward_mean": float(rewards.mean()), "sync_mib": mib})
    # the weights really moved: the rollout model equals the learner's, and differs from the initial one
    own = dict(learner.engine.module.named_parameters())
    diff = max(float((p.detach().float().cpu() - own[n].detach().float().cpu()).abs().max())
               for n, p in worker.model.named_parameters() if n in own)
    moved = max(float((p.detach().float().cpu() - before[n]).abs().max()) for n, p in worker.model.named_parameters())
    log(f"rollout model vs learner after the last sync: max |diff| {diff:.3g}; moved by the RL steps: {moved:.3g}")
    if diff > 1e-6 and cfg.rollout.dtype == "fp32":
        raise AssertionError(f"weight sync left the rollout model {diff} away from the learner")
    if not moved > 0:
        raise AssertionError("the RL steps did not change the rollout model's weights")
    report["weights_moved_max"] = moved

    # 3. the fused-linear loss path on the same first batch, from the same initial weights
    if not args.no_fused_linear_check:
        del learner
        cfg2 = make_cfg(args.device, "true", args.overrides)
        learner2 = Learner(cfg2)
        learner2.warmup([warmup_texts(task_prompts(cfg2.task), cfg2.task.warmup_batch_size,
                                      random.Random("trainer_gpu_check/warmup"))])
        if not learner2.fused_linear:
            raise AssertionError("actor.fused_linear=true did not switch the learner to the fused-linear loss")
        out2 = learner2.train_batch(learner_view(first_batch))
        l1, l2 = report["steps"][0]["losses"], [mb["loss"] for mb in out2["parts"]["minibatches"]]
        log(f"fused-linear learner, step 0: losses {l2} (unfused {l1})")
        report["fused_linear_losses"] = l2
        # same weights and batch: mini-batch 0 must agree to fp32 rounding (mini-batch 1 follows an Adam step of
        # slightly different gradients, so it may drift a little more)
        if abs(l1[0] - l2[0]) > 1e-5 * max(1.0, abs(l1[0])):
            raise AssertionError(f"fused-linear loss {l2[0]} != unfused {l1[0]} on the same weights and batch")
    report["seconds"] = time.perf_counter() - t_start
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        log(f"wrote {args.json}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    log(f"total {report['seconds']:.1f}s")
    print("trainer_gpu_check: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
