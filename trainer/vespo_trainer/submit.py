"""`vespo submit -- vespo train ...`: `ray job submit` with a working directory that uploads only the code and
configs, never a virtual environment, build outputs, runs or .git.

`ray job submit --working-dir .` zips everything under the directory that `.gitignore` / `.rayignore` do
not list, and the dashboard refuses an upload over 100 MiB (HTTP 413): one forgotten venv (`.venv2`) is
enough. Here the runtime env's `excludes` (gitignore-style patterns relative to the working directory,
which Ray applies on top of `.gitignore` and `.rayignore`) drop:

  - EXCLUDES below (VCS, caches, build outputs, wheels, runs/, venv-named directories);
  - every directory within two levels that is a virtual environment or conda env (holds `pyvenv.cfg` or
    `conda-meta/`), whatever its name;
  - the user's `--exclude PATTERN`s.

What is left is measured first (the same walk Ray makes, when Ray's packaging module is importable): more
than --max-upload-mb (default 100, the dashboard's limit) is an error naming the largest entries, before
anything is sent.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

from .errors import SubmitError

EXCLUDES = [
    ".git/", "**/__pycache__/", "*.pyc", ".pytest_cache/", ".ruff_cache/", ".mypy_cache/", ".tox/", ".nox/",
    "build/", "_skbuild/", "dist/", "wheelhouse/", "*.egg-info/", "node_modules/", "runs/",
    ".venv*/", "venv*/", "**/site-packages/",
]
UPLOAD_LIMIT_MB = 100.0  # ray.dashboard's client_max_size (DASHBOARD_CLIENT_MAX_SIZE)


def _is_env(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "pyvenv.cfg")) or os.path.isdir(os.path.join(path, "conda-meta"))


def env_dirs(root: str, depth: int = 2) -> List[str]:
    """Virtual/conda environments under root (relative paths, '/'-separated), down to `depth` levels."""
    out = []

    def visit(rel: str, level: int) -> None:
        here = os.path.join(root, rel) if rel else root
        try:
            names = sorted(os.listdir(here))
        except OSError:
            return
        for name in names:
            sub = f"{rel}/{name}" if rel else name
            full = os.path.join(root, sub)
            if not os.path.isdir(full) or os.path.islink(full) or name == ".git":
                continue
            if _is_env(full):
                out.append(sub)
            elif level < depth:
                visit(sub, level + 1)

    visit("", 1)
    return out


def runtime_env(working_dir: str, extra_excludes: Sequence[str] = ()) -> dict:
    """The runtime env `vespo submit` sends: the working directory and its excludes."""
    root = os.path.abspath(working_dir)
    excludes = EXCLUDES + [f"/{d}/" for d in env_dirs(root)] + list(extra_excludes)
    return {"working_dir": root, "excludes": excludes}


def upload_sizes(env: dict) -> Optional[Dict[str, int]]:
    """Bytes per top-level entry that Ray would upload for this runtime env (its own walk: .gitignore,
    .rayignore and the excludes); None when Ray's packaging module is not there to ask."""
    try:
        from pathlib import Path

        from ray._private.runtime_env import packaging
    except ImportError:
        return None
    root = Path(env["working_dir"])
    sizes: Dict[str, int] = {}

    def count(p: Path) -> None:
        if p.is_file():
            top = p.relative_to(root).parts[0]
            sizes[top] = sizes.get(top, 0) + p.stat().st_size

    quiet = logging.getLogger("vespo.submit.walk")  # Ray logs every ignore file it meets at INFO
    quiet.setLevel(logging.WARNING)
    try:
        packaging._dir_travel(root, [packaging._get_excludes(root, env["excludes"])], count,
                              include_gitignore=True, logger=quiet)
    except (AttributeError, TypeError):  # another Ray's private API: skip the estimate, Ray still checks
        return None
    return sizes


def check_size(env: dict, limit_mb: float) -> Optional[float]:
    """The upload in MiB (uncompressed); SubmitError naming the largest entries when over limit_mb."""
    sizes = upload_sizes(env)
    if sizes is None:
        return None
    total = sum(sizes.values()) / 2**20
    if total > limit_mb:
        top = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
        listed = ", ".join(f"{name} ({b / 2**20:.0f} MiB)" for name, b in top)
        raise SubmitError(f"the working directory {env['working_dir']} would upload {total:.0f} MiB "
                          f"(limit --max-upload-mb={limit_mb:g}; Ray's dashboard refuses more than 100 MiB); "
                          f"largest: {listed}. Leave them out with --exclude NAME/ (repeatable) or a .rayignore "
                          "file, or submit from a smaller --working-dir")
    return total


def ray_command() -> str:
    """The `ray` CLI of this Python (next to sys.executable), else the one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "ray")
    found = here if os.access(here, os.X_OK) else shutil.which("ray")
    if not found:
        raise SubmitError("no `ray` command next to this Python or on PATH: pip install \"vespo[train]\"")
    return found


def submit_command(env: dict, entrypoint: Sequence[str], address: Optional[str], no_wait: bool) -> List[str]:
    cmd = [ray_command(), "job", "submit", "--runtime-env-json", json.dumps(env)]
    if address:
        cmd += ["--address", address]
    if no_wait:
        cmd.append("--no-wait")
    return cmd + ["--", *entrypoint]


def submit(entrypoint: Sequence[str], *, working_dir: str = ".", address: Optional[str] = None,
           excludes: Sequence[str] = (), max_upload_mb: float = UPLOAD_LIMIT_MB, no_wait: bool = False,
           dry_run: bool = False, log=print) -> int:
    """Check the upload, then run `ray job submit` (its exit code); dry_run: print what would be sent."""
    if not entrypoint:
        raise SubmitError("nothing to run: vespo submit [options] -- vespo train [key=value ...]")
    if not os.path.isdir(working_dir):
        raise SubmitError(f"--working-dir: no such directory: {working_dir}")
    env = runtime_env(working_dir, excludes)
    mb = check_size(env, max_upload_mb)
    cmd = submit_command(env, entrypoint, address, no_wait)
    log(f"vespo submit: working dir {env['working_dir']}"
        + (f" ({mb:.1f} MiB to upload)" if mb is not None else "")
        + f"; left out besides .gitignore / .rayignore: {' '.join(env['excludes'])}")
    if dry_run:
        log(shlex.join(cmd))
        return 0
    return subprocess.call(cmd)
