"""Async vs sync training throughput on the embedded default, measured side by side in one run.

    python benchmarks/bench_async.py                    # ~3 minutes on 2 cores
    python benchmarks/bench_async.py --samples 8192 --json benchmarks/results/async_cpu.json

Every setting trains the same number of samples of the embedded default (`vespo train` with no config)
in one local Ray; the first --skip optimizer-step records (start-up, first pushes) are left out of the
rate. Printed per setting: trained tokens/s (prompt + response), the ratio to sync, the lag actually
trained on (mean / max, from the learner's per-sample versions), rollout and learner utilisation
(async; sync alternates, so its utilisations add up to at most ~1), and weight-sync seconds per push
and per MiB.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "trainer"))  # a source checkout benchmarks its own trainer (Ray workers too)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(ROOT, "trainer"), os.environ.get("PYTHONPATH")]))

# name -> overrides; sync default: N = 32 / 8 = 4 optimizer steps per rollout step, lags 0..3
SETTINGS = {
    "sync N=4 (default)": [],
    "async trigger=4 threshold=0": ["trainer.mode=async", "async.trigger_parameter_sync_step=4",
                                    "async.staleness_threshold=0"],
    "async trigger=4 threshold=0.5": ["trainer.mode=async", "async.trigger_parameter_sync_step=4",
                                      "async.staleness_threshold=0.5"],
    "async trigger=4 threshold=1": ["trainer.mode=async", "async.trigger_parameter_sync_step=4",
                                    "async.staleness_threshold=1"],
    "async trigger=4 threshold=1 partial": ["trainer.mode=async", "async.trigger_parameter_sync_step=4",
                                            "async.staleness_threshold=1", "async.partial_rollout=true"],
    "async trigger=4 threshold=1 chunk=8": ["trainer.mode=async", "async.trigger_parameter_sync_step=4",
                                            "async.staleness_threshold=1", "async.rollout_chunk=8"],
}


def run_one(name, overrides, samples, out_dir):
    from vespo_trainer.config import load_config
    from vespo_trainer.metrics_log import read_metrics
    from vespo_trainer.loops.run import train

    probe = load_config(None, overrides)
    per_step = (probe.async_step_groups if probe.trainer.mode == "async" else probe.data.train_batch_size) * \
        probe.rollout.n
    steps = max(1, samples // per_step)
    run_dir = os.path.join(out_dir, name.replace(" ", "_").replace("=", "").replace("(", "").replace(")", ""))
    cfg = load_config(None, [*overrides, f"trainer.total_steps={steps}", f"trainer.output_dir={run_dir}",
                             "trainer.progress=none", "trainer.save_every=0", "trainer.tensorboard=false"])
    t0 = time.perf_counter()
    train(cfg)
    total_s = time.perf_counter() - t0
    return read_metrics(run_dir), per_step, total_s


def summarise(recs, skip_samples, per_step):
    skip = min(len(recs) - 1, max(1, skip_samples // per_step))
    rs = recs[skip:]
    wall = sum(r["time/step_s"] for r in rs)
    tokens = sum(r["perf/tokens_per_s"] * r["time/step_s"] for r in rs)
    lags = [(r["staleness/mean"], r["staleness/max"]) for r in rs]
    syncs = [(r["time/weight_sync_s"], r["perf/weight_sync_mb"]) for r in rs if r["perf/weight_sync_mb"] > 0]
    n_sync = sum(r.get("async/weight_syncs", 1) for r in rs if r["perf/weight_sync_mb"] > 0)
    sync_s = sum(s for s, _ in syncs) / max(n_sync, 1)
    mb = syncs[0][1] if syncs else float("nan")
    util = lambda k: sum(r.get(k, float("nan")) * r["time/step_s"] for r in rs) / wall  # noqa: E731
    if "perf/rollout_util" not in rs[0]:  # sync: the share of the step each phase took
        ru = sum(r["time/rollout_s"] for r in rs) / wall
        lu = sum(r["time/learner_s"] for r in rs) / wall
    else:
        ru, lu = util("perf/rollout_util"), util("perf/learner_util")
    return {"tokens_per_s": tokens / wall, "measured_s": wall, "records": len(rs),
            "lag_mean": sum(m for m, _ in lags) / len(lags), "lag_max": max(x for _, x in lags),
            "reward_last": sum(r["reward/mean"] for r in rs[-max(1, len(rs) // 5):]) / max(1, len(rs) // 5),
            "rollout_util": ru, "learner_util": lu, "sync_s_per_push": sync_s,
            "sync_s_per_mb": sync_s / mb if mb == mb and mb > 0 else float("nan"), "sync_mb": mb}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=8192, help="samples trained per setting")
    p.add_argument("--skip", type=int, default=1024, help="samples at the start left out of the rate")
    p.add_argument("--only", nargs="*", help="names of settings to run (default: all)")
    p.add_argument("--repeats", type=int, default=1, help="runs per setting, interleaved; the median is reported "
                                                          "(this VM's speed drifts by tens of percent between runs)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    names = [k for k in SETTINGS if not args.only or k in args.only]
    runs = {k: [] for k in names}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name in names:
                recs, per_step, total_s = run_one(name, SETTINGS[name], args.samples, os.path.join(tmp, str(rep)))
                r = {**summarise(recs, args.skip, per_step), "total_s": total_s}
                runs[name].append(r)
                print(f"[{rep + 1}/{args.repeats}] {name:38s} {r['tokens_per_s']:8.0f} tok/s  lag mean "
                      f"{r['lag_mean']:.2f} max {r['lag_max']:.0f}  util rollout {r['rollout_util']:.2f} learner "
                      f"{r['learner_util']:.2f}  push {r['sync_s_per_push'] * 1e3:.1f} ms "
                      f"({r['sync_s_per_mb'] * 1e3:.1f} ms/MiB)  reward(last 20%) {r['reward_last']:.3f}", flush=True)
    results = {}
    for name, rs in runs.items():
        rates = sorted(r["tokens_per_s"] for r in rs)
        med = rs[[r["tokens_per_s"] for r in rs].index(rates[len(rates) // 2])]
        results[name] = {**med, "tokens_per_s_runs": rates, "overrides": SETTINGS[name]}
    ray.shutdown()
    base = next((v for k, v in results.items() if k.startswith("sync")), None)
    if base:
        print("\nratio to sync (tokens/s):")
        for name, r in results.items():
            r["ratio_to_sync"] = r["tokens_per_s"] / base["tokens_per_s"]
            print(f"  {name:38s} {r['ratio_to_sync']:.2f}x   (lag mean {r['lag_mean']:.2f}, max {r['lag_max']:.0f}; "
                  f"util rollout {r['rollout_util']:.2f} learner {r['learner_util']:.2f}; runs: "
                  + ", ".join(f"{x:.0f}" for x in r["tokens_per_s_runs"]) + " tok/s)")
    if args.json:
        meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                "samples": args.samples, "skip": args.skip, "repeats": args.repeats}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
