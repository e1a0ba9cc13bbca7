"""The `vespo` command (also `python -m vespo_trainer`).

    vespo train [--config FILE.yaml] [key=value ...]      train (veRL-style dotted overrides)
    vespo train --dry-run [...]                           validate and print the plan; start nothing
    vespo train --print-config [...]                      the resolved config with every key's help
    vespo plot RUN_DIR                                    PNG curves into RUN_DIR/plots/
    vespo export RUN_DIR --out DIR [--tag step_000100]    a checkpoint as a Hugging Face model directory
    vespo data prepare --input X --output Y.parquet       a dataset in veRL's schema (see data/verl.py)
    vespo submit [--address URL] -- vespo train ...       `ray job submit` without venvs/builds/runs in the upload

A user-fixable error (errors.VespoUserError) of any subcommand ends here: its message and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import List, Optional

from . import __version__
from .errors import VespoUserError

DEPS = {"train": ("omegaconf", "ray", "deepspeed", "transformers", "rich"), "plot": ("matplotlib",),
        "export": ("omegaconf", "deepspeed", "transformers", "tokenizers"), "data": ("pyarrow",),
        "submit": ("ray",)}


def plan_text(cfg) -> str:
    """What a run with this config will do (the --dry-run output). Loads the tokenizer and the prompts
    (so a bad model.path or data file shows here); raises ValueError if they cannot be loaded."""
    from .cluster import ray_address
    from .config import missing_paths
    from .data.tasks import load_prompts
    from .metrics_log import plural
    from .tokenizer import make_tokenizer

    missing = missing_paths(cfg)
    n_prompts = "?" if missing else len(load_prompts(cfg, make_tokenizer(cfg), log=lambda s: None))

    tb, mb, n, N = cfg.data.train_batch_size, cfg.actor.ppo_mini_batch_size, cfg.rollout.n, cfg.staleness
    lw = cfg.actor.num_workers
    micro = cfg.actor.micro_batch_size or mb * n // lw
    alg = cfg.algorithm
    params = ", ".join(f"{k}={v}" for k, v in alg.loss_params.items()) or "defaults"
    old = "recomputed by the learner" if alg.recompute_old_logp else "from the rollout engine"
    rcc = alg.rollout_correction
    corr = "; rollout correction: " + ", ".join(
        ([f"IS {rcc.rollout_is} (threshold {rcc.rollout_is_threshold}"
          + (", batch-normalised)" if rcc.rollout_is_batch_normalize else ")")] if rcc.rollout_is else [])
        + ([f"rejection {rcc.rollout_rs} (threshold {rcc.rollout_rs_threshold})"] if rcc.rollout_rs else [])
    ) if rcc.active else ("; rollout correction: metrics only" if alg.recompute_old_logp else "")
    addr = ray_address(cfg)
    if cfg.trainer.mode == "async":
        ac, S = cfg.async_, cfg.async_.trigger_parameter_sync_step * cfg.async_step_groups
        lag = cfg.async_max_lag
        mode = [
            f"  mode          async: an optimizer step per {plural(cfg.async_step_groups, 'prompt group')} "
            f"({ac.require_batches} x {mb}); weights pushed every {plural(ac.trigger_parameter_sync_step, 'step')} "
            f"(S = {S} groups per push)",
            f"  window        at most (1 + {ac.staleness_threshold:g}) x {S} = {plural(cfg.async_window, 'group')} "
            f"started but not trained when a push lands; {plural(cfg.rollout_chunk, 'group')} per generate call; "
            f"partial rollout {'on' if ac.partial_rollout else 'off'}"
            + (f"; drop samples older than {ac.max_lag}" if ac.max_lag >= 0 else ""),
            f"  lag           a sample is trained at most {plural(lag, 'optimizer step')} after the weights that "
            f"generated it (ceil({cfg.async_window} / {cfg.async_step_groups}) - 1"
            + ("; a response that spans a push counts from its oldest token" if ac.partial_rollout else "")
            + ("); on-policy (= sync N=1)" if lag == 0 else
               "); on-policy instead: async.trigger_parameter_sync_step=1 async.staleness_threshold=0"),
        ]
        tb, N = cfg.async_step_groups, 1  # prompts and optimizer steps per step, for the lines below
        push = f"every {plural(ac.trigger_parameter_sync_step, 'optimizer step')}"
    else:
        push = "after every step"
        mode = [
            f"  mode          sync: staleness N = train_batch_size / ppo_mini_batch_size = {tb} / {mb} = "
            f"{plural(N, 'optimizer step')} per rollout step",
            f"  lag           mini-batch k of a step trains on data k policy versions old: k = 0..{N - 1} "
            f"(expected mean {(N - 1) / 2:g}, max {N - 1})",
        ]
    lines = [
        "vespo train: plan (dry run; nothing was started)",
        *mode,
        f"  samples       {tb} prompts x {n} responses = {tb * n} per step; {mb} prompts = {mb * n} responses per "
        f"mini-batch; micro-batch {micro} (gradient accumulation {mb * n // lw // micro}"
        + (f" on each of {lw} learner ranks)" if lw > 1 else ")"),
        f"  run           {cfg.trainer.total_steps} steps = {cfg.trainer.total_steps * N} optimizer steps, "
        f"{cfg.trainer.total_steps * tb * n:,} samples; task {cfg.task.name} ({n_prompts} prompts"
        + (f" of {len(cfg.data.train_files)} file(s)), reward {cfg.reward.function or 'math'}"
           if cfg.task.name == "dataset" else f"), format warm-up {cfg.task.warmup_steps} steps"),
        f"  loss          {alg.loss} ({params}; agg {alg.agg or 'default'}); group advantages; old_logp {old}"
        + corr,
        (f"  model         {cfg.model.path} (transformers, local files)" if cfg.model.path else
         f"  model         {cfg.model.arch} {cfg.model.num_layers} layers x {cfg.model.hidden_size} hidden, "
         f"built in-process (seed {cfg.trainer.seed})"),
        "  actors        learner x{lw} (DeepSpeed ZeRO-{z}, {world}, AdamW lr {lr:g}, {c:g} CPU{each}); rollout x{r} "
        "({b}, {d}, T={t:g}, {rc:g} CPU each); reward x{w} ({p} processes, {to:g}s per call)".format(
            lw=lw, world=f"world size {lw}: {mb * n // lw} responses per rank per mini-batch" if lw > 1 else
            "world size 1", each=" each" if lw > 1 else "",
            z=cfg.actor.zero_stage, lr=cfg.actor.lr, c=cfg.actor.num_cpus, r=cfg.rollout.num_workers,
            b=cfg.rollout.backend, d=cfg.rollout.dtype, t=cfg.rollout.temperature, rc=cfg.rollout.num_cpus,
            w=cfg.reward.num_workers, p=cfg.reward.num_procs, to=cfg.reward.timeout_s),
        _gpu_line(cfg),
        f"  weight sync   {push}, buckets of <= {cfg.weight_sync.bucket_mb:g} MiB through Ray",
        f"  ray           {'join ' + addr if addr else 'start a local Ray'}"
        + (f" with {cfg.ray.num_cpus} CPUs" if not addr and cfg.ray.num_cpus else ""),
        f"  output        {cfg.trainer.output_dir or 'runs/' + cfg.trainer.experiment_name + '-<time>'}"
        + (" (resume from its latest checkpoint)" if cfg.trainer.resume else ""),
    ]
    lines += [f"  NOT HERE      {m} (needed to train; everything else was validated)" for m in missing]
    return "\n".join(lines)


def _gpu_line(cfg) -> str:
    """The GPUs the actors ask for (-1: one each on cuda, shared when the cluster has fewer; none on cpu)."""
    dev, w, r = cfg.trainer.device, cfg.actor.num_workers, cfg.rollout.num_workers
    if dev == "cpu" and cfg.actor.num_gpus <= 0 and cfg.rollout.num_gpus <= 0:
        return "  gpus          none (trainer.device=cpu)"
    each = [(w, cfg.actor.num_gpus, "learner"), (r, cfg.rollout.num_gpus, "rollout")]
    if dev == "auto" and any(g < 0 for _, g, _ in each):
        return ("  gpus          one per learner rank and rollout worker when a GPU is visible "
                f"({w} + {r}; fewer GPUs are shared), none otherwise (trainer.device=auto)")
    parts = [(k, 1.0 if g < 0 else g, name) for k, g, name in each]
    total = sum(k * g for k, g, _ in parts)
    return ("  gpus          " + " + ".join(f"{name} {k} x {g:g}" for k, g, name in parts)
            + f" = {total:g} GPUs" + (" (fewer: the -1 settings share them)" if any(g < 0 for _, g, _ in each) else ""))


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
    p.add_argument("--version", action="version", version=f"vespo {__version__}")
    sub = p.add_subparsers(dest="command")
    t = sub.add_parser("train", help="train (or resume) a policy",
                       description="Train with the embedded default, a YAML config and/or key=value overrides, "
                                   "e.g. `vespo train trainer.total_steps=50 algorithm.loss=grpo`.")
    t.add_argument("--config", help="YAML config (see examples/configs/)")
    t.add_argument("--dry-run", action="store_true", help="validate and print the plan; start nothing")
    t.add_argument("--print-config", action="store_true", help="print the resolved config with help text")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. rollout.n=8")
    pl = sub.add_parser("plot", help="write PNG curves of a run into RUN_DIR/plots/")
    pl.add_argument("run_dir")
    ex = sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory",
                        description="config.json + model.safetensors + tokenizer files that transformers "
                                    "(AutoModelForCausalLM, AutoTokenizer) and vLLM load.")
    ex.add_argument("run_dir")
    ex.add_argument("--out", required=True, help="output directory")
    ex.add_argument("--tag", help="checkpoint, e.g. step_000100 (default: the latest)")
    da = sub.add_parser("data", help="dataset tools")
    dsub = da.add_subparsers(dest="data_command", required=True)
    pr = dsub.add_parser("prepare", help="write a parquet file in veRL's schema",
                         description="Input: a parquet/JSONL file already in veRL's schema (validated and "
                                     "normalised), or rows with problem|question and answer|solution fields "
                                     "(converted, with --instruction appended to each question).")
    pr.add_argument("--input", required=True, help=".parquet, .jsonl or .json (one object per line)")
    pr.add_argument("--output", required=True, help="the .parquet file to write")
    pr.add_argument("--instruction", default=None, help="appended to converted questions (default: "
                    "'Please reason step by step, and put your final answer within \\boxed{}.'; '' for none)")
    pr.add_argument("--data-source", default=None, help="data_source of every row (default: kept, or the input "
                    "file's name for converted rows)")
    su = sub.add_parser("submit", help="ray job submit, uploading the code but no venvs, builds or runs",
                        description="Runs `ray job submit` with a runtime env whose working_dir is --working-dir "
                                    "and whose excludes drop .git, caches, build outputs, runs/ and every virtual "
                                    "or conda environment (any name); the upload is measured first. Example: "
                                    "vespo submit --address http://127.0.0.1:8265 -- vespo train trainer.mode=async")
    su.add_argument("--address", help="the Ray dashboard, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)")
    su.add_argument("--working-dir", default=".", help="the directory to upload (default: .)")
    su.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                    help="another gitignore-style pattern to leave out, e.g. data/raw/ (repeatable)")
    su.add_argument("--max-upload-mb", type=float, default=100.0,
                    help="refuse to submit a larger upload (default 100: Ray's dashboard limit)")
    su.add_argument("--no-wait", action="store_true", help="submit and return (ray job submit --no-wait)")
    su.add_argument("--dry-run", action="store_true", help="print the upload size, the excludes and the command")
    su.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- then the command, e.g. -- vespo train ...")
    return p


def _missing_deps(command: str) -> List[str]:
    import importlib.util

    return [m for m in DEPS.get(command, ()) if importlib.util.find_spec(m) is None]


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `vespo`
        parser.print_help()
        return 0
    missing = _missing_deps(args.command)
    if missing:
        print(f"vespo {args.command} needs {', '.join(missing)}: pip install \"vespo[train]\" "
              "(after torch; see the README)", file=sys.stderr)
        return 2
    where = {"train": "vespo", "data": "vespo data prepare"}.get(args.command, f"vespo {args.command}")
    try:
        return COMMANDS[args.command](args)
    except VespoUserError as exc:  # the one place a user's error ends: its message, exit code 2
        print(f"{where}: {exc.label + ': ' if exc.label else ''}{exc}", file=sys.stderr)
        return 2


def _export(args) -> int:
    from .hf_export import export_checkpoint

    export_checkpoint(args.run_dir, args.out, args.tag)
    return 0


def _data(args) -> int:
    from .data.verl import INSTRUCTION, prepare

    prepare(args.input, args.output, INSTRUCTION if args.instruction is None else args.instruction, args.data_source)
    return 0


def _submit(args) -> int:
    from .submit import submit

    entry = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    return submit(entry, working_dir=args.working_dir, address=args.address, excludes=args.exclude,
                  max_upload_mb=args.max_upload_mb, no_wait=args.no_wait, dry_run=args.dry_run)


def _plot(args) -> int:
    from .plot import plot_run

    print("\n".join(plot_run(args.run_dir)))
    return 0


def _train(args) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.overrides, check_paths=not args.dry_run)
    if args.print_config:
        print(config_help_text(cfg))
        return 0
    if args.dry_run:
        print(plan_text(cfg))
        return 0
    from .loops import run
    from .loops.interrupt import Interrupted, TrainingAborted

    try:
        run_dir = run.train(cfg)
    except Interrupted as exc:  # saved, or before the first step: the hint says whether a checkpoint exists
        print(f"vespo: {exc}; {_resume_hint(cfg)}", file=sys.stderr)
        return 130
    except TrainingAborted as exc:
        print(f"vespo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vespo: stopped at once (no checkpoint written now); {_resume_hint(cfg)}", file=sys.stderr)
        return 130
    print(f"done: {run_dir}  (curves: vespo plot {run_dir})")
    return 0


def _resume_hint(cfg) -> str:
    """What is true after a stop: a checkpoint to continue from, or none yet."""
    from . import checkpoint as ckpt

    run_dir = cfg.trainer.output_dir  # set by the run when it was null
    try:
        tag = ckpt.latest(run_dir) if run_dir else None
    except VespoUserError:
        tag = None
    if tag is None:
        return "no checkpoint was written yet: run the same command again to start over" + \
            (f" (with another trainer.output_dir, or after removing {run_dir})" if run_dir and
             os.path.exists(os.path.join(run_dir, "metrics.jsonl")) else "")
    return f"continue from {tag} with trainer.resume=true trainer.output_dir={run_dir}"


COMMANDS = {"train": _train, "export": _export, "data": _data, "plot": _plot, "submit": _submit}


if __name__ == "__main__":
    sys.exit(main())
