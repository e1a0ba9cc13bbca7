"""The embedded default run (`vespo train`, no config) over several seeds: mean reward per window and
the spread over seeds, so a README figure can be stated with its run-to-run variation.

    python benchmarks/default_run_seeds.py --seeds 0 1 2 --out runs/default_seeds   # ~4-7 min per seed
    python benchmarks/default_run_seeds.py --seeds 0 1 --jobs 2 --set actor.lr=1e-3  # overrides for every run
    python benchmarks/default_run_seeds.py --summarise runs/default_seeds/s0 runs/old/s0  # existing run dirs

Each run is `python -m vespo_trainer train trainer.seed=S trainer.output_dir=OUT/sS` with this
checkout's trainer (and its vespo_ext when a compiled `_core` module sits in python/vespo_ext/, as in a
source build), one subprocess per seed, `--jobs` at a time (a sync run keeps about one core busy).
The training is deterministic for a given seed and code, so one run per seed is enough; a change of
the numerics (a kernel's rounding) changes the curve like a change of seed does, which is why the
spread over seeds is the yardstick for "the curve changed". Windows are by position in
metrics.jsonl (the first record is the first step, whatever number it carries).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_info import host_info  # noqa: E402  (sibling module; the script runs as benchmarks/<name>.py)

# label -> [start, end) by position; 'last 100' is taken from the run's own length
WINDOWS = [("first 100", 0, 100), ("250-500", 250, 500), ("500-750", 500, 750), ("750-1000", 750, 1000)]


def read_rewards(run_dir: str) -> tuple[list[float], float | None]:
    """Mean reward per step (one value per step; a resumed run's repeated steps keep the last line) and
    the summed step time when the records carry it."""
    by_step: dict[int, dict] = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for i, line in enumerate(f):
            if line.strip():
                rec = json.loads(line)
                by_step[int(rec.get("step", i))] = rec
    recs = [by_step[k] for k in sorted(by_step)]
    times = [r["time/step_s"] for r in recs if "time/step_s" in r]
    return [float(r["reward/mean"]) for r in recs], (sum(times) if len(times) == len(recs) else None)


def summarise(rewards: list[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, a, b in WINDOWS:
        part = rewards[a:b]
        out[name] = statistics.fmean(part) if len(part) == b - a else None
    out["last 100"] = statistics.fmean(rewards[-100:]) if len(rewards) >= 100 else None
    return out


def _env() -> dict:
    paths = [os.path.join(ROOT, "trainer")]
    if glob.glob(os.path.join(ROOT, "python", "vespo_ext", "_core*.so")):
        paths.insert(0, os.path.join(ROOT, "python"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, env.get("PYTHONPATH")]))
    return env


def run_seeds(seeds: list[int], out: str, jobs: int, overrides: list[str]) -> dict[str, float]:
    """Start the runs, `jobs` at a time; returns run dir -> wall seconds."""
    os.makedirs(out, exist_ok=True)
    pending = list(seeds)
    running: dict[subprocess.Popen, tuple[str, float, object]] = {}
    walls: dict[str, float] = {}
    while pending or running:
        while pending and len(running) < jobs:
            seed = pending.pop(0)
            run_dir = os.path.join(out, f"s{seed}")
            log = open(run_dir + ".log", "w")
            cmd = [sys.executable, "-m", "vespo_trainer", "train", f"trainer.seed={seed}",
                   f"trainer.output_dir={run_dir}", "trainer.progress=plain", "trainer.tensorboard=false",
                   *overrides]
            print("start:", " ".join(cmd[1:]), flush=True)
            running[subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT)] = \
                (run_dir, time.perf_counter(), log)
        time.sleep(2)
        for proc in [p for p in running if p.poll() is not None]:
            run_dir, t0, log = running.pop(proc)
            log.close()
            if proc.returncode != 0:
                raise SystemExit(f"{run_dir}: vespo train exited {proc.returncode}; see {run_dir}.log")
            walls[run_dir] = time.perf_counter() - t0
            print(f"done: {run_dir} ({walls[run_dir]:.0f} s)", flush=True)
    return walls


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def print_table(run_dirs: list[str], walls: dict[str, float]) -> None:
    cols = [w[0] for w in WINDOWS] + ["last 100"]
    rows = []
    print(f"| run | steps | {' | '.join(cols)} | wall s (run) | step-time sum s |")
    print("|---|---:|" + "---:|" * len(cols) + "---:|---:|")
    for d in run_dirs:
        rewards, step_s = read_rewards(d)
        s = summarise(rewards)
        rows.append(s)
        wall = walls.get(d)
        print(f"| {d} | {len(rewards)} | " + " | ".join(_fmt(s[c]) for c in cols)
              + f" | {'—' if wall is None else f'{wall:.0f}'} | {'—' if step_s is None else f'{step_s:.0f}'} |")
    if len(rows) > 1:
        for label, fn in (("mean", statistics.fmean), ("std (sample)", statistics.stdev),
                          ("min", min), ("max", max)):
            vals = []
            for c in cols:
                xs = [r[c] for r in rows if r[c] is not None]
                vals.append(_fmt(fn(xs)) if len(xs) > 1 else "—")
            print(f"| {label} | | " + " | ".join(vals) + " | | |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/default_seeds", help="run dirs go to OUT/s<seed>")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each keeps ~1 core busy)")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], help="dotted overrides for every run")
    ap.add_argument("--summarise", nargs="+", metavar="RUN_DIR", help="only print the table of these run dirs")
    args = ap.parse_args()
    try:
        import torch
        tv, threads = torch.__version__, torch.get_num_threads()
    except ImportError:
        tv, threads = None, None
    print(json.dumps(host_info(tv, threads)))
    if args.summarise:
        print_table(args.summarise, {})
        return
    walls = run_seeds(args.seeds, args.out, max(1, args.jobs), args.overrides)
    print_table([os.path.join(args.out, f"s{s}") for s in args.seeds], walls)


if __name__ == "__main__":
    main()
