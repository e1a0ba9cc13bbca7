"""`vespo submit`: what a working directory uploads does not depend on what else lies in it. Planted
virtual environments (any name), build outputs, runs and a big untracked directory in a temp dir; the
sizes are measured by Ray's own walk of the directory (sparse files: instant, and as large as a real venv).
The end-to-end submission is tests/trainer/test_ray_job.py."""
from __future__ import annotations

import os

import pytest

from vespo_trainer import cli
from vespo_trainer.submit import SubmitError, runtime_env, submit, upload_sizes

GiB = 2**30


def _sparse(path, size):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


@pytest.fixture
def checkout(tmp_path):
    root = tmp_path / "repo"
    (root / "examples" / "configs").mkdir(parents=True)
    (root / "examples" / "configs" / "tiny.yaml").write_text("trainer:\n  total_steps: 2\n")
    (root / "README.md").write_text("# x\n")
    for env in (".venv2", "myenv", "tools/py311"):  # a venv named like none of the fixed patterns, one level down
        (root / env).mkdir(parents=True)
        (root / env / "pyvenv.cfg").write_text("home = /usr/bin\n")
        _sparse(str(root / env / "lib" / "big.bin"), int(1.5 * GiB))
    (root / "conda" / "conda-meta").mkdir(parents=True)
    _sparse(str(root / "conda" / "lib" / "big.bin"), GiB)
    for junk in ("build/x.o", "runs/r1/metrics.jsonl", ".git/objects/pack", "dist/a.whl", "notes/ignored.bin"):
        _sparse(str(root / junk), 200 * 2**20)
    (root / ".gitignore").write_text("notes/ignored.bin\n")
    return root


def test_venvs_builds_runs_and_git_are_left_out(checkout):
    env = runtime_env(str(checkout))
    assert {"/myenv/", "/.venv2/", "/tools/py311/", "/conda/"} <= set(env["excludes"])
    sizes = upload_sizes(env)
    assert set(sizes) == {"examples", "README.md", ".gitignore"}, sizes  # tools/ is empty once its venv is out
    assert sum(sizes.values()) < 2**20


def test_a_big_untracked_directory_is_refused_naming_it(checkout, capsys):
    _sparse(str(checkout / "bigdata" / "dump.parquet"), 300 * 2**20)
    with pytest.raises(SubmitError, match=r"would upload 300 MiB .*largest: bigdata \(300 MiB\).*--exclude"):
        submit(["vespo", "train"], working_dir=str(checkout), dry_run=True)
    # the CLI: message and exit code 2, nothing submitted
    assert cli.main(["submit", "--working-dir", str(checkout), "--dry-run", "--", "vespo", "train"]) == 2
    assert "bigdata (300 MiB)" in capsys.readouterr().err
    # left out on request: submitted (dry run: the command is printed)
    assert cli.main(["submit", "--working-dir", str(checkout), "--exclude", "bigdata/", "--dry-run",
                     "--address", "http://127.0.0.1:1", "--", "vespo", "train", "trainer.mode=async"]) == 0
    out = capsys.readouterr().out
    assert "job submit --runtime-env-json" in out and "bigdata/" in out and out.rstrip().endswith(
        "--address http://127.0.0.1:1 -- vespo train trainer.mode=async")


def test_submit_needs_a_command(checkout, capsys):
    assert cli.main(["submit", "--working-dir", str(checkout)]) == 2
    assert "nothing to run" in capsys.readouterr().err
