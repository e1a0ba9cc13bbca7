"""`vespo plot RUN_DIR`: PNG curves from metrics.jsonl into RUN_DIR/plots/ (matplotlib, Agg backend)."""
from __future__ import annotations

import os
from typing import List

from .errors import RunNotFound
from .metrics_log import METRICS_FILE, read_metrics

YLABELS = {"reward": "reward", "loss": "loss / KL", "phi": "φ (VESPO's sequence weight)",
           "w_seq": "W (sequence importance ratio)", "throughput": "tokens / s", "time": "seconds per step"}
NOTES = {"phi": "φ(W) = W^k e^{λ(1-W)}: the weight of a sequence with importance ratio W (1 at W = 1)"}
PANELS = {
    "reward": [("reward/mean", "mean reward")],
    "loss": [("actor/loss", "loss"), ("actor/approx_kl", "approx KL")],
    "phi": [("vespo/phi_mean", "phi mean"), ("vespo/phi_min", "phi min"), ("vespo/phi_max", "phi max")],
    "w_seq": [("vespo/w_seq_mean", "W mean"), ("vespo/w_seq_min", "W min"), ("vespo/w_seq_max", "W max")],
    "throughput": [("perf/tokens_per_s", "tokens/s")],
    "time": [("time/step_s", "step"), ("time/rollout_s", "rollout"), ("time/learner_s", "learner"),
             ("time/weight_sync_s", "weight sync")],
}


def plot_run(run_dir: str) -> List[str]:
    """Writes one PNG per panel plus the lag histogram; returns their paths."""
    if not os.path.isfile(os.path.join(run_dir, METRICS_FILE)):
        raise RunNotFound(f"{run_dir} has no {METRICS_FILE} (is it a vespo run directory?)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = read_metrics(run_dir)
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    steps = [r["step"] for r in rows]
    for name, series in PANELS.items():
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for key, label in series:
            ys = [r.get(key) for r in rows]
            pts = [(s, y) for s, y in zip(steps, ys) if isinstance(y, (int, float))]
            if pts:
                xs, vs = zip(*pts)
                if name == "reward" and len(vs) >= 20:  # noisy per step: show a moving average over it
                    ax.plot(xs, vs, alpha=0.3, label=label)
                    w = max(5, len(vs) // 40)
                    ax.plot(xs[w - 1:], [sum(vs[i - w + 1:i + 1]) / w for i in range(w - 1, len(vs))],
                            label=f"{label} ({w}-step mean)")
                else:
                    ax.plot(xs, vs, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(YLABELS[name])
        ax.set_title(name.replace("_", " "))
        if name in NOTES:
            fig.text(0.01, 0.01, NOTES[name], fontsize=7, alpha=0.8)
        if name in ("w_seq", "throughput"):
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"{name}.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    # lag histogram over the whole run: the lag each sample was actually trained at
    hist = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("staleness/hist_") and isinstance(v, (int, float)):
                lag = int(k.rsplit("_", 1)[1])
                hist[lag] = hist.get(lag, 0) + v
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if hist:
        ax.bar(list(hist), list(hist.values()))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # lags are whole policy versions
    ax.set_xlabel("lag (policy versions between generation and update)")
    ax.set_ylabel("samples")
    ax.set_title("staleness")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "lag_hist.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
