"""Staleness study at toy scale (issue #8): does VESPO stay stable where GRPO, GSPO and SAPO fail?

    python experiments/staleness_study.py run                      # the whole grid (60 runs); resumes
    python experiments/staleness_study.py run --dry-run            # the grid, what is done, estimated time
    python experiments/staleness_study.py run --only 'N16-*' --seeds 0     # a subset
    python experiments/staleness_study.py summarise                # table + PNG curves into docs/

The grid (docs/staleness_study.md explains the choices):
  - sync, staleness N in {1, 4, 16, 64}: actor.ppo_mini_batch_size = MINI_BATCH prompts and
    data.train_batch_size = N x MINI_BATCH, so every setting takes the same OPT_STEPS optimizer steps on
    the same number of samples (MINI_BATCH x rollout.n per optimizer step); only the lag differs
    (mini-batch k of a rollout step is k policy versions old, k = 0..N-1);
  - one fully asynchronous setting (the paper's: trigger_parameter_sync_step 4, staleness_threshold 1,
    partial rollout), OPT_STEPS learner steps of MINI_BATCH prompts;
  - x losses vespo, grpo, gspo, sapo x seeds 0, 1, 2; the rollout model runs in bf16 (the learner in
    fp32), so there is a train/inference mismatch as in the paper; the old log-probs are the rollout's.
Each run is one `vespo train` subprocess (its own local Ray) writing into OUT/<run name>/; up to
--jobs run at once. A run whose last checkpoint is at its final step is skipped; a started one is
continued with trainer.resume=true (the trainer replays the same data order and seeds), so an
interrupted study resumes where it stopped when the same command is run again.

`summarise` reads every run's metrics.jsonl and writes DOCS/results.md (the table), DOCS/summary.json
(per run) and DOCS/reward_<setting>.png, and replaces the block between the RESULTS_BEGIN/END markers
of --doc (docs/staleness_study.md) with the table. Collapse: see `collapse()`.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "trainer"))  # a source checkout uses its own trainer

NS = (1, 4, 16, 64)
LOSSES = ("vespo", "grpo", "gspo", "sapo")
SEEDS = (0, 1, 2)
MINI_BATCH = 8       # prompts per optimizer step (x rollout.n = 8 responses = 64 samples)
OPT_STEPS = 4096     # optimizer steps per run, every setting (a multiple of max(NS))
# Every run: bf16 rollout (train/inference mismatch) and run-directory housekeeping.
COMMON = ["rollout.dtype=bf16", "trainer.progress=plain", "trainer.tensorboard=false",
          "trainer.provenance=false", "trainer.keep_checkpoints=1", "ray.num_cpus=2"]
# The paper's fully asynchronous setting (docs/spec.md "Staleness").
ASYNC = ["trainer.mode=async", "async.trigger_parameter_sync_step=4", "async.staleness_threshold=1",
         "async.partial_rollout=true"]
# The smoke (--smoke, the test): the tiny model of examples/configs/tiny.yaml, a few steps.
SMOKE = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=2",
         "model.intermediate_size=64", "rollout.n=4", "task.warmup_steps=4", "task.warmup_batch_size=16",
         "reward.num_procs=1"]
# For --dry-run's estimate; measured on the shared 2-vCPU machine with two runs at a time
# (docs/staleness_study.md): seconds per optimizer step of MINI_BATCH prompts x 8 responses, per
# rollout step (sync: generate, score, weight sync), and per run start (Ray, actors, warm-up).
SEC_PER_OPT_STEP = {"sync": 0.05, "async": 0.035}
SEC_PER_ROLLOUT_STEP = 0.025
SEC_PER_START = 25.0


@dataclass
class Run:
    name: str           # N16-vespo-s0, async-gspo-s1
    setting: str        # N16, async
    loss: str
    seed: int
    total_steps: int    # trainer.total_steps (sync: rollout steps; async: optimizer steps)
    overrides: List[str] = field(default_factory=list)

    @property
    def opt_steps_per_record(self) -> int:
        """Optimizer steps behind one metrics.jsonl record (N in sync mode, 1 in async mode)."""
        return int(self.setting[1:]) if self.setting.startswith("N") else 1


def make_grid(ns, losses, seeds, opt_steps: int, mini_batch: int, with_async: bool, extra: List[str]) -> List[Run]:
    runs = []
    settings = [f"N{n}" for n in ns] + (["async"] if with_async else [])
    for setting in settings:
        for loss in losses:
            for seed in seeds:
                if setting == "async":
                    total, ov = opt_steps, ASYNC + [f"data.train_batch_size={mini_batch}"]
                else:
                    n = int(setting[1:])
                    if opt_steps % n:
                        raise SystemExit(f"--steps {opt_steps} is not a multiple of N={n}")
                    total, ov = opt_steps // n, [f"data.train_batch_size={n * mini_batch}"]
                ov = COMMON + ov + [f"actor.ppo_mini_batch_size={mini_batch}", f"algorithm.loss={loss}",
                                    f"trainer.seed={seed}", f"trainer.total_steps={total}",
                                    f"trainer.save_every={max(1, total // 16)}",
                                    f"trainer.log_every={max(1, total // 8)}"] + extra
                runs.append(Run(f"{setting}-{loss}-s{seed}", setting, loss, seed, total, ov))
    return runs


# -- running --------------------------------------------------------------------------------------
def run_status(run_dir: str, total_steps: int) -> str:
    """done (last checkpoint at the final step), partial (started), or new."""
    from vespo_trainer import checkpoint as ckpt

    if not os.path.isdir(run_dir):
        return "new"
    tag = ckpt.latest(run_dir)
    if tag is not None and ckpt.read_trainer_state(run_dir, tag)["step"] >= total_steps:
        return "done"
    return "partial" if os.listdir(run_dir) else "new"


def estimate_s(run: Run) -> float:
    if run.setting == "async":
        return SEC_PER_START + run.total_steps * SEC_PER_OPT_STEP["async"]
    per_rollout_step = SEC_PER_ROLLOUT_STEP + run.opt_steps_per_record * SEC_PER_OPT_STEP["sync"]
    return SEC_PER_START + run.total_steps * per_rollout_step


def _fmt(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _check_design(out: str, design: dict, force: bool) -> None:
    """OUT/study.json pins the design; resuming runs under another design would mix two studies."""
    path = os.path.join(out, "study.json")
    if os.path.exists(path) and not force:
        with open(path) as f:
            old = json.load(f)
        diff = [k for k in design if old.get(k) != design[k]]
        if diff:
            raise SystemExit(f"{out} holds a study with another design ({', '.join(diff)} differ: "
                             f"{ {k: old.get(k) for k in diff} } vs { {k: design[k] for k in diff} }); "
                             "choose another --out, or --force to reuse it")
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(design, f, indent=1)


def _launch(run: Run, out: str):
    run_dir = os.path.join(out, run.name)
    ov = list(run.overrides) + [f"trainer.output_dir={run_dir}"]
    if run_status(run_dir, run.total_steps) == "partial":
        ov.append("trainer.resume=true")
    os.makedirs(run_dir, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "trainer")] + [p for p in [env.get("PYTHONPATH")] if p])
    log = open(os.path.join(run_dir, "train.log"), "a")
    proc = subprocess.Popen([sys.executable, "-m", "vespo_trainer", "train", *ov], stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    return proc, log


def _final_reward(run_dir: str) -> Optional[float]:
    try:
        from vespo_trainer.metrics_log import read_metrics

        rows = read_metrics(run_dir)
        tail = rows[-max(1, len(rows) // 10):]
        return sum(r["reward/mean"] for r in tail) / len(tail)
    except (OSError, KeyError, ValueError, ZeroDivisionError):
        return None


def cmd_run(args, runs: List[Run]) -> int:
    todo = [r for r in runs if run_status(os.path.join(args.out, r.name), r.total_steps) != "done"]
    est = sum(estimate_s(r) for r in todo)
    print(f"staleness study: {len(runs)} runs in {args.out} ({len(runs) - len(todo)} done, {len(todo)} to run); "
          f"{args.steps} optimizer steps of {args.mini_batch} prompts each; --jobs {args.jobs}")
    if args.dry_run:
        for r in runs:
            st = run_status(os.path.join(args.out, r.name), r.total_steps)
            print(f"  {r.name:<18} {st:<8} total_steps={r.total_steps:<5} est {_fmt(estimate_s(r))}  "
                  f"vespo train {' '.join(r.overrides)}")
        par = max(1, min(args.jobs, 2))
        full = sum(estimate_s(r) for r in runs)
        print(f"estimated time: {_fmt(est)} of one core left ({_fmt(full)} for all {len(runs)}); about "
              f"{_fmt(est / par)} wall with --jobs {args.jobs} on 2 free cores ({_fmt(full / par)} for all); "
              "measured costs in docs/staleness_study.md")
        return 0
    _check_design(args.out, design(args), args.force)
    t0, done, failed, active = time.time(), 0, [], []
    queue = list(todo)
    while queue or active:
        while queue and len(active) < args.jobs:
            r = queue.pop(0)
            proc, log = _launch(r, args.out)
            active.append((r, proc, log, time.time()))
            print(f"[{time.strftime('%H:%M:%S')}] start {r.name}", flush=True)
        try:
            time.sleep(1.0)
        except KeyboardInterrupt:  # the runs got the Ctrl-C too: each saves a checkpoint and stops
            print("Ctrl-C: waiting for the runs in progress to checkpoint and stop; rerun the same command to "
                  "continue", flush=True)
            for _, proc, log, _ in active:
                proc.wait()
                log.close()
            return 130
        for item in list(active):
            r, proc, log, t_start = item
            if proc.poll() is None:
                continue
            active.remove(item)
            log.close()
            done += 1
            run_dir = os.path.join(args.out, r.name)
            left = sum(estimate_s(q) for q in queue) / max(1, min(args.jobs, 2))
            if proc.returncode == 0:
                fr = _final_reward(run_dir)
                msg = f"done in {_fmt(time.time() - t_start)}, final reward {fr:.3f}" if fr is not None else "done"
            else:
                failed.append(r.name)
                msg = f"FAILED (exit {proc.returncode}; see {run_dir}/train.log)"
            print(f"[{time.strftime('%H:%M:%S')}] {done}/{len(todo)} {r.name} {msg}; elapsed "
                  f"{_fmt(time.time() - t0)}, about {_fmt(left)} left", flush=True)
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(failed)} (run the same command again to retry them)")
        return 1
    print(f"all {len(runs)} runs done; next: python experiments/staleness_study.py summarise --out {args.out}")
    return 0


# -- summarising ----------------------------------------------------------------------------------
def gen_versions(rows: List[dict], per_record: int) -> List[float]:
    """x of each record: the mean policy version (optimizer steps) that generated its samples."""
    xs = []
    for i, r in enumerate(rows):
        v = r.get("actor/version")
        if v is None:
            xs.append(float(i * per_record))
        else:  # the record's updates used versions v - per_record .. v - 1; gen = update - lag
            xs.append(v - per_record + (per_record - 1) / 2 - r.get("staleness/mean", 0.0))
    return xs


def smooth(xs: List[float], ys: List[float], window: float) -> List[float]:
    """Mean of the ys whose x lies in (x - window, x] (a trailing window in optimizer steps)."""
    out, lo, acc = [], 0, 0.0
    for i, x in enumerate(xs):
        acc += ys[i]
        while xs[lo] <= x - window:
            acc -= ys[lo]
            lo += 1
        out.append(acc / (i - lo + 1))
    return out


MIN_GAIN = 0.1       # a run "learned" if its smoothed reward rose at least this much above its start
COLLAPSE_FRAC = 0.5  # ... and "collapsed" if it then lost more than this fraction of its gain, for good


def collapse(xs: List[float], sm: List[float]) -> dict:
    """Collapse of a smoothed reward curve, from some point after its peak to the end of the run:
      - a run that learned (rose by at least MIN_GAIN above its first value) stays below
        start + COLLAPSE_FRAC x (peak - start): it lost more than that fraction of its gain for good;
      - a run that did not learn stays below COLLAPSE_FRAC x start: it fell well below the chance
        level it started at (e.g. the policy stopped ending its responses) and did not come back.
    Returns {start, peak, peak_x, learned, collapsed, collapse_x (the first x of the final stretch below)}."""
    start = sm[0]
    ipk = max(range(len(sm)), key=lambda i: sm[i])
    peak = sm[ipk]
    res = {"start": start, "peak": peak, "peak_x": xs[ipk], "learned": peak - start >= MIN_GAIN,
           "collapsed": False, "collapse_x": None}
    level = start + COLLAPSE_FRAC * (peak - start) if res["learned"] else COLLAPSE_FRAC * start
    i = len(sm)
    while i > ipk + 1 and sm[i - 1] < level:
        i -= 1
    if i < len(sm):
        res.update(collapsed=True, collapse_x=xs[i])
    return res


def _mean(vals):
    vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def _extreme(fn, rows, key):
    return fn((r[key] for r in rows if isinstance(r.get(key), (int, float))), default=float("nan"))


def run_summary(run_dir: str, run: Run, opt_steps: int) -> Optional[dict]:
    """Per-run statistics from metrics.jsonl (None if the run has no records)."""
    from vespo_trainer.metrics_log import read_metrics

    if not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        return None
    rows = read_metrics(run_dir)
    if not rows:
        return None
    per = run.opt_steps_per_record
    xs = gen_versions(rows, per)
    ys = [r["reward/mean"] for r in rows]
    sm = smooth(xs, ys, opt_steps / 16)
    last = [y for x, y in zip(xs, ys) if x >= xs[-1] - opt_steps / 10]  # the last 10% of the run
    bad = sorted({k for r in rows for k, v in r.items() if v is None})  # non-finite values are logged as null
    lag_n = sum(r.get("vespo/n_seq", 1) for r in rows)
    return {
        "run": run.name, "setting": run.setting, "loss": run.loss, "seed": run.seed,
        "complete": run_status(run_dir, run.total_steps) == "done", "opt_steps": per * len(rows),
        "final_reward": _mean(last), **collapse(xs, sm),
        "steps_to_half": next((x for x, v in zip(xs, sm) if v >= 0.5), None),
        "phi_mean": _mean([r.get("vespo/phi_mean") for r in rows]),
        "phi_min": _extreme(min, rows, "vespo/phi_min"),
        "w_mean": _mean([r.get("vespo/w_seq_mean") for r in rows]),
        "w_max": _extreme(max, rows, "vespo/w_seq_max"),
        "frac_w_gt_100": _mean([r.get("vespo/frac_w_gt_100") for r in rows]),
        "clip_frac": _mean([r.get("vespo/clip_frac") for r in rows]),
        "approx_kl": _mean([r.get("actor/approx_kl") for r in rows]),
        "lag_mean": sum(r["staleness/mean"] * r.get("vespo/n_seq", 1) for r in rows) / lag_n,
        "lag_max": max(r["staleness/max"] for r in rows),
        "non_finite": bad, "x": xs, "reward": ys, "smooth": sm,
    }


def _pm(vals):
    vals = [v for v in vals if math.isfinite(v)]
    if not vals:
        return "–"
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return f"{m:.3f} ± {sd:.3f}"


def _g(v, fmt=".3g"):
    return "–" if not math.isfinite(v) else format(v, fmt)


def table(summaries: List[dict], settings: List[str], losses) -> str:
    head = ("| setting | loss | seeds | final reward (mean ± std) | peak | opt. steps to 0.5 | "
            "collapsed (at opt. step) | φ mean | φ min | W mean | W max | clip frac | lag mean / max |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in settings:
        for loss in losses:
            rs = [r for r in summaries if r["setting"] == s and r["loss"] == loss]
            if not rs:
                continue
            seeds = f"{len(rs)}" + ("" if all(r["complete"] for r in rs) else " (partial)")
            col = [r for r in rs if r["collapsed"]]
            coll = f"{len(col)}/{len(rs)}" + (f" ({', '.join(str(int(r['collapse_x'])) for r in col)})" if col else "")
            nl = [r for r in rs if not r["learned"] and not r["collapsed"]]
            if nl:
                coll += f"; {len(nl)} never learned"
            if any(r["non_finite"] for r in rs):
                coll += "; non-finite metrics"
            reached = [r["steps_to_half"] for r in rs if r["steps_to_half"] is not None]
            t50 = (f"{_mean(reached):.0f}" if reached else "never") + ("" if len(reached) in (0, len(rs)) else
                                                                      f" ({len(reached)}/{len(rs)} seeds)")
            lines.append(
                f"| {s} | {loss} | {seeds} | {_pm([r['final_reward'] for r in rs])} | "
                f"{_mean([r['peak'] for r in rs]):.3f} | {t50} | {coll} | {_g(_mean([r['phi_mean'] for r in rs]))} | "
                f"{_g(min(r['phi_min'] for r in rs))} | {_g(_mean([r['w_mean'] for r in rs]))} | "
                f"{_g(max(r['w_max'] for r in rs))} | {_g(_mean([r['clip_frac'] for r in rs]), '.2f')} | "
                f"{_mean([r['lag_mean'] for r in rs]):.1f} / {max(r['lag_max'] for r in rs)} |")
    return "\n".join(lines)


def plot_setting(summaries: List[dict], setting: str, losses, path: str, opt_steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, loss in enumerate(losses):
        color = f"C{i}"
        for j, r in enumerate(r for r in summaries if r["setting"] == setting and r["loss"] == loss):
            ax.plot(r["x"], r["smooth"], color=color, lw=1.4, alpha=0.85, label=loss if j == 0 else None)
            if r["collapsed"]:
                ax.axvline(r["collapse_x"], color=color, ls=":", lw=0.8)
    title = "fully async (trigger 4, threshold 1, partial rollout)" if setting == "async" else \
        f"staleness N = {setting[1:]}"
    ax.set_title(f"{title}\ntraining reward, {opt_steps // 16}-step trailing mean, one line per seed", fontsize=9)
    ax.set_xlabel("optimizer steps (policy version that generated the batch)")
    ax.set_ylabel("training reward")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


RESULTS_BEGIN, RESULTS_END = "<!-- RESULTS_BEGIN (written by staleness_study.py summarise) -->", "<!-- RESULTS_END -->"


def cmd_summarise(args, runs: List[Run]) -> int:
    summaries = []
    for r in runs:
        s = run_summary(os.path.join(args.out, r.name), r, args.steps)
        if s is not None:
            summaries.append(s)
    if not summaries:
        print(f"no runs with metrics in {args.out}")
        return 1
    os.makedirs(args.docs, exist_ok=True)
    settings = [s for s in [f"N{n}" for n in NS] + ["async"] if any(r["setting"] == s for r in summaries)]
    losses = [loss for loss in LOSSES if any(r["loss"] == loss for r in summaries)]
    pngs = []
    for s in settings:
        pngs.append(f"reward_{s}.png")
        plot_setting(summaries, s, losses, os.path.join(args.docs, pngs[-1]), args.steps)
    tab = table(summaries, settings, losses)
    n_done = sum(r["complete"] for r in summaries)
    rel = os.path.relpath(args.docs, os.path.dirname(os.path.abspath(args.doc)) if args.doc else args.docs)
    partial = "" if n_done == len(runs) else " **(a partial grid: not the study's final results)**"
    body = (f"{len(summaries)} of the {len(runs)} runs of the grid have metrics, {n_done} of them complete "
            f"({args.steps} optimizer steps per run){partial}.\n\n"
            + tab + "\n\n" + "\n".join(f"![{p}]({rel}/{p})" for p in pngs) + "\n")
    with open(os.path.join(args.docs, "results.md"), "w") as f:
        f.write("# Staleness study: results (generated by `python experiments/staleness_study.py summarise`)\n\n"
                + body.replace(f"]({rel}/", "]("))
    with open(os.path.join(args.docs, "summary.json"), "w") as f:
        json.dump([{k: v for k, v in r.items() if k not in ("x", "reward", "smooth")} for r in summaries], f,
                  indent=1)
    if args.doc and os.path.isfile(args.doc):
        with open(args.doc) as f:
            text = f.read()
        if RESULTS_BEGIN in text and RESULTS_END in text:
            a, rest = text.split(RESULTS_BEGIN, 1)
            _, b = rest.split(RESULTS_END, 1)
            with open(args.doc, "w") as f:
                f.write(a + RESULTS_BEGIN + "\n" + body + RESULTS_END + b)
    print(tab)
    print(f"wrote {args.docs}/results.md, summary.json and {len(pngs)} PNGs")
    return 0


# -- command line ---------------------------------------------------------------------------------
def design(args) -> dict:
    return {"steps": args.steps, "mini_batch": args.mini_batch, "smoke": args.smoke, "set": args.set}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("run", "summarise"))
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "staleness_study"), help="the study's run directories")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each uses about one core in sync mode)")
    p.add_argument("--dry-run", action="store_true", help="print the grid, its status and the estimated time")
    p.add_argument("--only", default="", help="comma-separated run-name patterns, e.g. 'N1-*,N16-gspo-*'")
    p.add_argument("--N", default=",".join(map(str, NS)), help="staleness values")
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--no-async", action="store_true", help="leave out the fully asynchronous setting")
    p.add_argument("--steps", type=int, default=OPT_STEPS, help="optimizer steps per run (a multiple of every N)")
    p.add_argument("--mini-batch", type=int, default=MINI_BATCH, help="prompts per optimizer step")
    p.add_argument("--smoke", action="store_true", help="the tiny model of the tests (seconds per run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra `vespo train` override for every run (part of the study's design)")
    p.add_argument("--force", action="store_true", help="reuse --out although its study.json differs")
    p.add_argument("--docs", default=os.path.join(ROOT, "docs", "staleness_study"),
                   help="summarise: folder for results.md, summary.json and the PNGs")
    p.add_argument("--doc", default=os.path.join(ROOT, "docs", "staleness_study.md"),
                   help="summarise: a page whose RESULTS_BEGIN/END block gets the table ('' for none)")
    args = p.parse_args(argv)
    extra = (SMOKE if args.smoke else []) + args.set
    runs = make_grid([int(n) for n in args.N.split(",")], args.losses.split(","),
                     [int(s) for s in args.seeds.split(",")], args.steps, args.mini_batch, not args.no_async, extra)
    bad = [loss for loss in args.losses.split(",") if loss not in LOSSES]
    if bad:
        p.error(f"--losses: unknown {bad}; choose from {', '.join(LOSSES)}")
    if args.only:
        pats = args.only.split(",")
        runs = [r for r in runs if any(fnmatch.fnmatch(r.name, pat) for pat in pats)]
        if not runs:
            p.error(f"--only {args.only!r} matches no run")
    return cmd_run(args, runs) if args.command == "run" else cmd_summarise(args, runs)


if __name__ == "__main__":
    sys.exit(main())
