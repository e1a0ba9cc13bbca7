"""Config: defaults, YAML files, overrides, validation errors, --dry-run and --print-config (no Ray)."""
from __future__ import annotations

import glob
import os

import pytest
from trainer_test_utils import ROOT, TINY

from vespo_trainer import cli
from vespo_trainer.config import ConfigError, load_config, to_dict


def test_defaults_and_keys_the_docs_rely_on():
    cfg = load_config()
    assert cfg.trainer.mode == "sync" and cfg.rollout.backend == "hf" and cfg.algorithm.loss == "vespo"
    for key in ("total_steps", "output_dir", "seed", "resume", "mode"):
        assert hasattr(cfg.trainer, key)
    assert cfg.staleness == cfg.data.train_batch_size // cfg.actor.ppo_mini_batch_size


def test_default_yaml_is_the_embedded_default():
    assert to_dict(load_config(os.path.join(ROOT, "examples", "configs", "default.yaml"))) == to_dict(load_config())


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "examples", "configs", "*.yaml"))))
def test_example_configs_load(path):
    load_config(path)


def test_overrides_and_types():
    cfg = load_config(TINY, ["trainer.total_steps=7", "algorithm.loss=grpo",
                             "algorithm.loss_params.clip_ratio_high=0.28", "rollout.temperature=0.7"])
    assert cfg.trainer.total_steps == 7 and cfg.algorithm.loss == "grpo"
    assert cfg.algorithm.loss_params == {"clip_ratio_high": 0.28} and cfg.rollout.temperature == 0.7
    assert cfg.rollout.n == 4  # from the YAML file


@pytest.mark.parametrize("overrides, key, words", [
    (["data.train_batch_size=30"], "data.train_batch_size", "multiple of actor.ppo_mini_batch_size"),
    (["rollout.n=1"], "rollout.n", "at least 2 responses"),
    (["algorithm.loss=ppo"], "algorithm.loss", "must be one of vespo, grpo, gspo, sapo, cispo"),
    (["algorithm.loss=grpo", "algorithm.loss_params.k_pos=2.0"], "algorithm.loss_params", "k_pos"),
    (["algorithm.agg=mean"], "algorithm.agg", "must be one of"),
    (["trainer.mode=async", "async.rollout_chunk=100"], "async.rollout_chunk", "exceed the window budget"),
    (["async.staleness_threshold=-1"], "async.staleness_threshold", ">= 0"),
    (["async.no_such_key=1"], "async.no_such_key", "not in"),
    (["trainer.mode=later"], "trainer.mode", "sync, async"),
    (["rollout.backend=vllm", "model.hidden_size=64", "model.num_heads=2", "model.num_kv_heads=2", "trainer.mode=async",
      "async.partial_rollout=true"], "async.partial_rollout", "not supported with rollout.backend=vllm"),
    (["rollout.backend=sglang"], "rollout.backend", "must be one of hf, vllm"),
    (["rollout.backend=vllm"], "model.hidden_size", "head sizes 32, 64"),  # the default 64 / 4 = 16
    (["rollout.backend=vllm", "model.hidden_size=48", "model.num_heads=2", "model.num_kv_heads=2"], "model.hidden_size", "= 24"),
    (["rollout.vllm_kv_cache_gb=0"], "rollout.vllm_kv_cache_gb", "> 0"),
    (["trainer.total_steps=0"], "trainer.total_steps", ">= 1"),
    (["trainer.total_steps=ten"], "trainer.total_steps", "could not be converted"),
    (["trainer.no_such_key=1"], "trainer.no_such_key", "not in"),
    (["actor.zero_stage=4"], "actor.zero_stage", "0, 1, 2 or 3"),
    (["actor.micro_batch_size=7"], "actor.micro_batch_size", "must divide"),
    (["rollout.dtype=int8"], "rollout.dtype", "fp32, bf16, fp16"),
    (["rollout.temperature=0"], "rollout.temperature", "> 0"),
    (["reward.function=not_a_spec"], "reward.function", "package.module:function"),
    (["reward.timeout_s=0"], "reward.timeout_s", "> 0"),
    (["trainer.resume=true"], "trainer.resume", "needs trainer.output_dir"),
    (["model.hidden_size=30", "model.num_heads=4"], "model.hidden_size", "multiple of model.num_heads"),
    (["justakey"], "overrides", "key=value"),
])
def test_validation_errors_name_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    msg = str(err.value)
    assert msg.startswith(key) or key in msg, msg
    assert words in msg, msg


def test_async_group_is_spelled_async(tmp_path):
    """`async` is a Python keyword: the dataclass field is async_, YAML and overrides say `async`."""
    path = tmp_path / "a.yaml"
    path.write_text("trainer:\n  mode: async\nasync:\n  staleness_threshold: 0.5\n  trigger_parameter_sync_step: 4\n")
    cfg = load_config(str(path), ["async.partial_rollout=true"])
    assert cfg.async_.staleness_threshold == 0.5 and cfg.async_.trigger_parameter_sync_step == 4
    assert cfg.async_.partial_rollout and cfg.async_window == int(1.5 * 4 * cfg.actor.ppo_mini_batch_size)
    assert "async" in to_dict(cfg) and "async_" not in to_dict(cfg)
    again = tmp_path / "b.yaml"
    from vespo_trainer.config import to_yaml

    again.write_text(to_yaml(cfg))
    assert to_dict(load_config(str(again))) == to_dict(cfg)


def test_vllm_backend_accepts_a_supported_head_size():
    cfg = load_config(TINY, ["rollout.backend=vllm", "model.hidden_size=64", "model.num_heads=2", "model.num_kv_heads=1"])
    assert cfg.rollout.backend == "vllm" and cfg.model.hidden_size // cfg.model.num_heads == 32


def test_missing_config_file():
    with pytest.raises(ConfigError, match="no such file"):
        load_config("/nonexistent/x.yaml")


def test_cli_config_error_exit_code(capsys):
    assert cli.main(["train", "data.train_batch_size=30"]) == 2
    assert "config error: data.train_batch_size" in capsys.readouterr().err


def test_dry_run_prints_the_plan(capsys):
    assert cli.main(["train", "--dry-run", "data.train_batch_size=32", "actor.ppo_mini_batch_size=4",
                     "rollout.n=8", "trainer.total_steps=10"]) == 0
    out = capsys.readouterr().out
    assert "staleness N = train_batch_size / ppo_mini_batch_size = 32 / 4 = 8" in out
    assert "k = 0..7" in out and "max 7" in out
    assert "32 prompts x 8 responses = 256 per step" in out and "4 prompts = 32 responses per mini-batch" in out
    assert "80 optimizer steps, 2,560 samples" in out
    assert "learner x1 (DeepSpeed ZeRO-1" in out and "rollout x1 (hf" in out and "reward x1" in out
    assert "start a local Ray" in out


def test_async_defaults_overlap_and_on_policy_is_explicit(capsys):
    """trainer.mode=async alone runs the setting the benchmark found fastest (trigger 4, threshold 0.5), and the
    dry run says what lag it allows; on-policy async (= sync N=1) is an explicit setting."""
    cfg = load_config(None, ["trainer.mode=async"])
    assert (cfg.async_.trigger_parameter_sync_step, cfg.async_.staleness_threshold) == (4, 0.5)
    assert cfg.async_window == 48 and cfg.async_max_lag == 5  # ceil(1.5 x 4 x 8 / 8) - 1, as measured (README)
    assert cli.main(["train", "--dry-run", "trainer.mode=async"]) == 0
    out = capsys.readouterr().out
    assert "trained at most 5 optimizer steps after the weights that generated it" in out
    assert "on-policy instead: async.trigger_parameter_sync_step=1 async.staleness_threshold=0" in out
    on = ["trainer.mode=async", "async.trigger_parameter_sync_step=1", "async.staleness_threshold=0"]
    assert load_config(None, on).async_max_lag == 0
    assert cli.main(["train", "--dry-run", *on]) == 0
    out = capsys.readouterr().out
    assert "at most 0 optimizer steps" in out and "on-policy (= sync N=1)" in out and "every 1 optimizer step," in out


def test_dry_run_with_ray_address(capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cli.main(["train", "--dry-run"]) == 0
    assert "join 10.0.0.1:6379" in capsys.readouterr().out


def test_print_config_has_help_for_every_key(capsys):
    assert cli.main(["train", "--print-config", "trainer.seed=3"]) == 0
    out = capsys.readouterr().out
    assert "trainer.seed = 3" in out and "algorithm.loss = 'vespo'" in out and "rollout.backend = 'hf'" in out
    keys = [ln for ln in out.splitlines() if not ln.startswith(" ")]
    helps = [ln for ln in out.splitlines() if ln.startswith("    ")]
    assert len(helps) >= len(keys) > 40


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "examples", "configs", "paper", "*.yaml"))))
def test_paper_configs_dry_run(path, capsys):
    """The paper's setups validate here; only their model and data (not on this machine) are listed as missing."""
    assert cli.main(["train", "--dry-run", "--config", path]) == 0
    out = capsys.readouterr().out
    assert "NOT HERE      model.path" in out and "NOT HERE      data.train_files" in out
    cfg = load_config(path, check_paths=False)
    assert cfg.model.path.endswith("Qwen3-30B-A3B-Base") and cfg.rollout.n == 8 and cfg.actor.lr == 1e-6
    assert cfg.algorithm.agg == "token-mean" and cfg.reward.function == "math"
    assert "  gpus          " in out
    if cfg.trainer.mode == "async":
        assert (cfg.async_.trigger_parameter_sync_step, cfg.async_.staleness_threshold) == (4, 1.0)
        assert cfg.actor.num_workers == 16 and "learner 16 x 1 + rollout 48 x 1 = 64 GPUs" in out
    else:
        assert cfg.staleness in (8, 16, 32, 64) and f"n{cfg.staleness}" in os.path.basename(path)


def test_rollout_correction_presets_expand_to_their_keys():
    from vespo_ext import ROLLOUT_CORRECTION_PRESETS
    from vespo_trainer.config import load_config

    for name, keys in ROLLOUT_CORRECTION_PRESETS.items():
        rc = load_config(None, [f"algorithm.rollout_correction.preset={name}"]).algorithm.rollout_correction
        assert rc.preset is None  # expanded: config.yaml holds the keys
        for k, v in keys.items():
            assert getattr(rc, k) == v, (name, k)
    # a preset plus a key it sets to something else is refused, naming the key
    with pytest.raises(ConfigError, match="rollout_correction.rollout_is"):
        load_config(None, ["algorithm.rollout_correction.preset=decoupled_token_is",
                           "algorithm.rollout_correction.rollout_is=sequence"])


def test_rollout_correction_keys():
    from vespo_trainer.config import load_config

    tis = load_config(None, ["algorithm.tis=true", "algorithm.tis_cap=3.0"]).algorithm
    assert tis.recompute_old_logp and tis.rollout_correction.kwargs()["rollout_is"] == "token"
    assert tis.rollout_correction.rollout_is_threshold == 3.0
    assert not load_config(None, []).algorithm.recompute_old_logp  # bypass by default, as before
    assert load_config(None, ["algorithm.behaviour_logp=recompute"]).algorithm.recompute_old_logp
    assert load_config(None, ["algorithm.rollout_correction.bypass_mode=false"]).algorithm.recompute_old_logp
    for bad, key in ((["algorithm.rollout_correction.bypass_mode=true", "algorithm.tis=true"], "bypass_mode"),
                     (["algorithm.tis=true", "algorithm.rollout_correction.rollout_is=sequence"], "algorithm.tis"),
                     (["algorithm.rollout_correction.rollout_is=seq"], "rollout_is"),
                     (["algorithm.rollout_correction.rollout_rs=token_k1"], "rollout_rs_threshold"),
                     (["algorithm.rollout_correction.preset=nope"], "preset")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, bad)
