"""The Ray job route, end to end: `ray start --head` on 127.0.0.1, then
`vespo submit --address http://127.0.0.1:<port> -- vespo train trainer.mode=async ...` (`ray job submit`
with the excludes of vespo_trainer/submit.py) reaches SUCCEEDED and the run directory holds the metrics.
The working directory is a temp copy of the configs with two planted 1.5 GiB virtual environments (one
named like none of the fixed patterns) and a runs/ directory, so the test does not depend on what else
lies in this checkout; the job checks that none of them reached it. The head runs in its own temp dir and
ports and is stopped by signalling its `ray start --block` process (never `ray stop`, which would stop
every Ray on the machine)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from trainer_test_utils import ROOT, TRAINER_SRC

from vespo_trainer.runtime import free_port


def _wait_http(url: str, timeout: float) -> None:
    import urllib.error
    import urllib.request

    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without the token: Ray's token authentication is on)
        except Exception:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout}s")


def test_ray_job_submit_async_run(tmp_path):
    bin_dir = os.path.dirname(sys.executable)
    # Ray >= 2.5x starts clusters with token authentication when ~/.ray/auth_token exists; the job client
    # sends the token only with RAY_AUTH_MODE=token (the README says the same).
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=TRAINER_SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    if not os.path.exists(os.path.expanduser("~/.ray/auth_token")):
        subprocess.run([os.path.join(bin_dir, "ray"), "get-auth-token", "--generate"], env=env, check=True,
                       capture_output=True, timeout=60)
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rj")  # short: Ray's socket paths have a length limit
    dash = free_port()
    head = subprocess.Popen(
        [os.path.join(bin_dir, "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
         f"--temp-dir={temp_dir}", "--include-dashboard=true", "--disable-usage-stats",
         # every port of its own: the test session's Ray (and any other) already holds the defaults, and a
         # dashboard agent that cannot bind its port leaves the job API answering "No available agent"
         *(f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                   "runtime-env-agent-port", "metrics-export-port",
                                                   "ray-client-server-port"))],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    run_dir = tmp_path / "job-run"
    work = tmp_path / "work"
    shutil.copytree(os.path.join(ROOT, "examples", "configs"), work / "examples" / "configs")
    for env_dir in (".venv2", "myenv"):
        (work / env_dir / "lib").mkdir(parents=True)
        (work / env_dir / "pyvenv.cfg").write_text("home = /usr/bin\n")
        with open(work / env_dir / "lib" / "big.bin", "wb") as f:
            f.truncate(3 * 2**29)  # sparse: 1.5 GiB at no cost (Ray would read and zip all of it)
    (work / "runs" / "old").mkdir(parents=True)
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", 120)
        train = ["vespo", "train", "--config", "examples/configs/tiny.yaml", "trainer.mode=async",
                 "async.staleness_threshold=1", "trainer.total_steps=6", f"trainer.output_dir={run_dir}"]
        cmd = [sys.executable, "-m", "vespo_trainer", "submit", "--address", f"http://127.0.0.1:{dash}",
               "--working-dir", str(work), "--", "bash", "-c",
               "test ! -e .venv2 && test ! -e myenv && test ! -e runs && test -f examples/configs/tiny.yaml || "
               "{ echo UPLOADED-JUNK-$((40 + 2)); ls -a; exit 3; }; exec \"$@\"", "job", *train]
        for _ in range(30):  # the dashboard answers before its job agent is up: retry that refusal only
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            out = proc.stdout + proc.stderr
            if "No available agent" not in out:
                break
            time.sleep(2)
        assert proc.returncode == 0 and "UPLOADED-JUNK-42" not in out, out[-4000:]
        assert "SUCCEEDED" in out or "succeeded" in out, out[-4000:]
        with open(run_dir / "metrics.jsonl") as f:
            recs = [json.loads(ln) for ln in f]
        assert [r["step"] for r in recs] == list(range(1, 7))
        assert max(r["staleness/max"] for r in recs) >= 1  # async with a threshold: older samples were trained
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000006"
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
