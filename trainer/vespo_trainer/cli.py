"""The `vespo` command (also `python -m vespo_trainer`).

    vespo train [--config FILE.yaml] [key=value ...]      train (veRL-style dotted overrides)
    vespo train --dry-run [...]                           validate and print the plan; start nothing
    vespo train --print-config [...]                      the resolved config with every key's help
    vespo plot RUN_DIR                                    PNG curves into RUN_DIR/plots/
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from typing import List, Optional

DEPS = {"train": ("omegaconf", "ray", "deepspeed", "transformers", "rich"), "plot": ("matplotlib",)}


def plan_text(cfg) -> str:
    """What a run with this config will do (the --dry-run output)."""
    from .cluster import ray_address
    from .task import task_prompts

    tb, mb, n, N = cfg.data.train_batch_size, cfg.actor.ppo_mini_batch_size, cfg.rollout.n, cfg.staleness
    lw = cfg.actor.num_workers
    micro = cfg.actor.micro_batch_size or mb * n // lw
    alg = cfg.algorithm
    params = ", ".join(f"{k}={v}" for k, v in alg.loss_params.items()) or "defaults"
    old = "recomputed by the learner" if (alg.behaviour_logp == "recompute" or alg.tis) else "from the rollout engine"
    addr = ray_address(cfg)
    lines = [
        "vespo train: plan (dry run; nothing was started)",
        f"  mode          {cfg.trainer.mode}: staleness N = train_batch_size / ppo_mini_batch_size = {tb} / {mb} = {N} "
        "optimizer steps per rollout step",
        f"  lag           mini-batch k of a step trains on data k policy versions old: k = 0..{N - 1} "
        f"(expected mean {(N - 1) / 2:g}, max {N - 1})",
        f"  samples       {tb} prompts x {n} responses = {tb * n} per step; {mb} prompts = {mb * n} responses per "
        f"mini-batch; micro-batch {micro} (gradient accumulation {mb * n // lw // micro}"
        + (f" on each of {lw} learner ranks)" if lw > 1 else ")"),
        f"  run           {cfg.trainer.total_steps} steps = {cfg.trainer.total_steps * N} optimizer steps, "
        f"{cfg.trainer.total_steps * tb * n:,} samples; task {cfg.task.name} "
        f"({len(task_prompts(cfg.task))} prompts), format warm-up {cfg.task.warmup_steps} steps",
        f"  loss          {alg.loss} ({params}; agg {alg.agg or 'default'}); group advantages; old_logp {old}"
        + (f"; TIS cap {alg.tis_cap}" if alg.tis else ""),
        f"  model         {cfg.model.arch} {cfg.model.num_layers} layers x {cfg.model.hidden_size} hidden, "
        f"built in-process (seed {cfg.trainer.seed})",
        "  actors        learner x{lw} (DeepSpeed ZeRO-{z}, {world}, AdamW lr {lr:g}, {c:g} CPU{each}); rollout x{r} "
        "({b}, {d}, T={t:g}, {rc:g} CPU each); reward x{w} ({p} processes, {to:g}s per call)".format(
            lw=lw, world=f"world size {lw}: {mb * n // lw} responses per rank per mini-batch" if lw > 1 else
            "world size 1", each=" each" if lw > 1 else "",
            z=cfg.actor.zero_stage, lr=cfg.actor.lr, c=cfg.actor.num_cpus, r=cfg.rollout.num_workers,
            b=cfg.rollout.backend, d=cfg.rollout.dtype, t=cfg.rollout.temperature, rc=cfg.rollout.num_cpus,
            w=cfg.reward.num_workers, p=cfg.reward.num_procs, to=cfg.reward.timeout_s),
        f"  weight sync   after every step, buckets of <= {cfg.weight_sync.bucket_mb:g} MiB through Ray",
        f"  ray           {'join ' + addr if addr else 'start a local Ray'}"
        + (f" with {cfg.ray.num_cpus} CPUs" if not addr and cfg.ray.num_cpus else ""),
        f"  output        {cfg.trainer.output_dir or 'runs/' + cfg.trainer.experiment_name + '-<time>'}"
        + (" (resume from its latest checkpoint)" if cfg.trainer.resume else ""),
    ]
    return "\n".join(lines)


def config_help_text(cfg) -> str:
    from .config import help_text, to_dict

    values = to_dict(cfg)
    out = []
    for key, _default, help in help_text():
        group, name = key.split(".", 1)
        out.append(f"{key} = {values[group][name]!r}")
        out += ["    " + ln for ln in textwrap.wrap(help, 96)]
    return "\n".join(out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vespo", description="VESPO off-policy RL training (Ray + DeepSpeed).")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) a policy",
                       description="Train with the embedded default, a YAML config and/or key=value overrides, "
                                   "e.g. `vespo train trainer.total_steps=50 algorithm.loss=grpo`.")
    t.add_argument("--config", help="YAML config (see examples/configs/)")
    t.add_argument("--dry-run", action="store_true", help="validate and print the plan; start nothing")
    t.add_argument("--print-config", action="store_true", help="print the resolved config with help text")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. rollout.n=8")
    pl = sub.add_parser("plot", help="write PNG curves of a run into RUN_DIR/plots/")
    pl.add_argument("run_dir")
    return p


def _missing_deps(command: str) -> List[str]:
    import importlib.util

    return [m for m in DEPS.get(command, ()) if importlib.util.find_spec(m) is None]


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    missing = _missing_deps(args.command)
    if missing:
        print(f"vespo {args.command} needs {', '.join(missing)}: pip install \"vespo[train]\" "
              "(after torch; see the README)", file=sys.stderr)
        return 2
    if args.command == "plot":
        from .plot import plot_run

        try:
            paths = plot_run(args.run_dir)
        except FileNotFoundError as exc:
            print(f"vespo plot: {exc}", file=sys.stderr)
            return 2
        print("\n".join(paths))
        return 0
    from .config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"vespo: config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_help_text(cfg))
        return 0
    if args.dry_run:
        print(plan_text(cfg))
        return 0
    from .sync_loop import train

    try:
        run_dir = train(cfg)
    except (FileExistsError, ConfigError) as exc:
        print(f"vespo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vespo: interrupted; resume with trainer.resume=true "
              f"trainer.output_dir={cfg.trainer.output_dir}", file=sys.stderr)
        return 130
    print(f"done: {run_dir}  (curves: vespo plot {run_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
