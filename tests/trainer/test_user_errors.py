"""Mistakes a user can fix end the run through the CLI with their message and exit code 2, never a
traceback: too few CPUs/GPUs for the actors, a missing optional backend (here and on a joined cluster), a
checkpoint of another world size. In-process against the session's Ray (no actor starts for the first two)."""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil

import pytest
from trainer_test_utils import TINY

from vespo_trainer import cli


def _train(capsys, tmp_path, *overrides):
    code = cli.main(["train", "--config", TINY, f"trainer.output_dir={tmp_path / 'run'}", "trainer.progress=none",
                     "trainer.tensorboard=false", *overrides])
    err = capsys.readouterr().err
    return code, err


def test_too_few_cpus_for_the_actors(ray_cluster, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, err = _train(capsys, tmp_path, "actor.num_cpus=64")
    assert code == 2 and "the actors need 64.75 CPUs" in err and "Traceback" not in err, err


def test_too_few_gpus_for_the_actors(ray_cluster, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, err = _train(capsys, tmp_path, "trainer.device=cuda", "actor.num_gpus=1", "rollout.num_gpus=1")
    assert code == 2 and "2 GPUs but the Ray cluster has" in err and "Traceback" not in err, err


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
@pytest.mark.parametrize("where", ["local", "cluster"])
def test_missing_backend(where, ray_cluster, tmp_path, capsys, monkeypatch):
    """cluster: a joined Ray (ray.address) checks in one of its workers, before any actor starts."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    addr = [f"ray.address={ray_cluster}"] if where == "cluster" else []
    code, err = _train(capsys, tmp_path, "rollout.backend=vllm", "model.hidden_size=64", "model.num_heads=2",
                       "model.num_kv_heads=2", *addr)
    assert code == 2 and "rollout.backend=vllm needs vllm" in err and "pip install vllm" in err, err
    assert "Traceback" not in err, err


def test_checkpoint_of_another_world_size(ray_cluster, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, _ = _train(capsys, tmp_path, "trainer.total_steps=1", "task.warmup_steps=0")
    assert code == 0
    # make the 1-rank checkpoint look like one of 2 ranks (a second optimizer shard)
    (shard,) = glob.glob(str(tmp_path / "run" / "checkpoints" / "step_000001" / "*zero_pp_rank_0_*optim_states.pt"))
    shutil.copy(shard, shard.replace("zero_pp_rank_0_", "zero_pp_rank_1_"))
    code, err = _train(capsys, tmp_path, "trainer.total_steps=2", "task.warmup_steps=0", "trainer.resume=true")
    assert code == 2 and "saved by 2 learner ranks but this run has actor.num_workers=1" in err, err
    assert "Traceback" not in err and os.path.isdir(tmp_path / "run"), err
