"""The CLI's first impressions and how it finds Ray: `vespo --version`, bare `vespo`, a local Ray that a
stale address file cannot hijack, and an unreachable address that fails fast, naming it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from trainer_test_utils import ROOT, TINY

from vespo_trainer import __version__, cli
from vespo_trainer.runtime import free_port


def test_version_and_bare_command_print_something_useful(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"vespo {__version__}"
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "usage: vespo" in out and "train" in out and "export" in out


@pytest.fixture
def stale_ray_tmpdir():
    """A RAY_TMPDIR whose address file names a Ray head that is gone (as after a killed `ray start --head`).
    Short path: Ray's socket names under it must stay below the 107-byte limit of Unix sockets."""
    tmp = tempfile.mkdtemp(prefix="vr", dir="/tmp")
    os.makedirs(os.path.join(tmp, "ray"))
    stale = f"127.0.0.1:{free_port()}"
    with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:
        f.write(stale)
    yield tmp, stale
    shutil.rmtree(tmp, ignore_errors=True)


def _env(tmp, **extra):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=tmp, **extra)
    return env


def test_token_auth_notice_filter_drops_only_that_notice(caplog):
    import logging

    from vespo_trainer.cluster import TOKEN_AUTH_LOGGER, TOKEN_AUTH_NOTICE, quiet_token_auth_notice

    log = logging.getLogger(TOKEN_AUTH_LOGGER)
    with caplog.at_level(logging.WARNING, logger=TOKEN_AUTH_LOGGER):
        with quiet_token_auth_notice():
            log.warning(TOKEN_AUTH_NOTICE + ". Set RAY_AUTH_MODE=disabled to opt out.")
            log.warning("Token authentication is disabled for this Ray cluster.")  # not this one
        log.warning(TOKEN_AUTH_NOTICE + ".")  # outside: shown
    shown = [r.getMessage() for r in caplog.records]
    assert len(shown) == 2 and "is disabled" in shown[0] and shown[1].startswith(TOKEN_AUTH_NOTICE), shown


def test_stale_address_file_does_not_hijack_the_local_ray(stale_ray_tmpdir):
    """Without ray.address / RAY_ADDRESS the trainer starts its own Ray, whatever the address file says, and
    without Ray's token-authentication notice."""
    tmp, stale = stale_ray_tmpdir
    code = ("import ray\n"
            "from vespo_trainer.cluster import ray_session\n"
            "from vespo_trainer.config import load_config\n"
            "from ray._raylet import AuthenticationMode, get_authentication_mode\n"
            "with ray_session(load_config(None, ['ray.num_cpus=1'])):\n"
            "    print('GCS', ray.get_runtime_context().gcs_address)\n"
            "    print('AUTH', get_authentication_mode() == AuthenticationMode.TOKEN)\n")
    t0 = time.time()
    env = _env(tmp)
    env.pop("RAY_AUTH_MODE", None)  # unset: Ray turns token auth on for a new local cluster, with a notice
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    gcs = [ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("GCS ")]
    assert gcs and gcs[0] != stale, (gcs, stale)
    # the notice is not printed over the progress bar; the authentication itself is still on
    assert "Token authentication is enabled" not in proc.stderr + proc.stdout, proc.stderr
    assert "AUTH True" in proc.stdout, proc.stdout
    assert time.time() - t0 < 170


@pytest.mark.parametrize("how", ["config", "env"])
def test_unreachable_ray_address_fails_fast_naming_it(stale_ray_tmpdir, tmp_path, how):
    """An address that nothing answers at: exit code 2 within the connect timeout, the address in the
    message, no traceback."""
    tmp, _ = stale_ray_tmpdir
    dead = f"127.0.0.1:{free_port()}"
    args = [f"ray.address={dead}"] if how == "config" else []
    env = _env(tmp, RAY_ADDRESS=dead) if how == "env" else _env(tmp)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "vespo_trainer", "train", "--config", TINY,
                           f"trainer.output_dir={tmp_path / 'run'}", "ray.connect_timeout_s=5", *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert dead in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert time.time() - t0 < 60
