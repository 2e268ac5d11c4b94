"""Unit tests for the job configuration: TOML + CLI loading, error messages that name the
key, and the cross-section checks of ``JobConfig.validate``."""

from __future__ import annotations

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

import pytest

from torchtitan_disagmoe.config.job_config import JobConfig
from torchtitan_disagmoe.config.manager import (
    ConfigError,
    config_to_dict,
    load_job_config,
    parse_cli_overrides,
    with_overrides,
)

TRAIN_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "train_configs").glob("*.toml"))
DEBUG_TOML = Path(__file__).resolve().parents[2] / "train_configs" / "debug_model.toml"


def _load(*args: str) -> JobConfig:
    return load_job_config(list(args))


def test_train_configs_exist():
    assert TRAIN_CONFIGS, "no train_configs/*.toml found"
    assert DEBUG_TOML in TRAIN_CONFIGS


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_train_configs_load(path):
    """Every shipped job file loads and names itself as the config file."""
    config = _load("--job.config_file", str(path))
    assert config.job.config_file == str(path)
    assert isinstance(config_to_dict(config), dict)


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_toml_values_beat_defaults(path):
    """Every value written in a job file ends up in the config (read back with tomllib, so
    the test follows edits to the files)."""
    with open(path, "rb") as f:
        toml_values = tomllib.load(f)
    config = _load("--job.config_file", str(path))
    for section, values in toml_values.items():
        for key, value in values.items():
            assert getattr(getattr(config, section), key) == value, f"{section}.{key}"


def test_debug_toml_differs_from_defaults():
    """The debug job file really overrides some defaults (else the test above proves little)."""
    config = _load("--job.config_file", str(DEBUG_TOML))
    assert config != JobConfig()


def test_defaults_without_file():
    config = _load()
    assert config == JobConfig()
    assert config.job.config_file is None


# ---------------------------------------------------------------- CLI


def test_cli_beats_toml_both_forms():
    """``--key=value`` and ``--key value`` both override the TOML file."""
    config = _load("--job.config_file", str(DEBUG_TOML), "--training.steps=7", "--optimizer.lr", "0.5")
    assert config.training.steps == 7
    assert config.optimizer.lr == 0.5
    with open(DEBUG_TOML, "rb") as f:
        toml_values = tomllib.load(f)
    # Keys not on the command line keep their TOML values.
    assert config.training.seq_len == toml_values["training"]["seq_len"]
    assert config.model.flavor == toml_values["model"]["flavor"]


def test_cli_beats_toml_regardless_of_order():
    """CLI wins even when the override comes before --job.config_file."""
    config = _load("--parallelism.expert_parallel_degree", "8", "--job.config_file", str(DEBUG_TOML))
    assert config.parallelism.expert_parallel_degree == 8


def test_bare_flag_means_true():
    """A key with no value is true, at the end or followed by another --key."""
    assert _load("--compile.enable").compile.enable is True
    config = _load("--compile.enable", "--training.steps", "3")
    assert config.compile.enable is True and config.training.steps == 3
    assert _load("--checkpoint.enable", "false").checkpoint.enable is False
    assert _load("--checkpoint.enable=False").checkpoint.enable is False


def test_parse_cli_overrides():
    """Parsing groups keys by section; dashes in keys become underscores; values stay strings."""
    got = parse_cli_overrides(["--training.steps=5", "--training.local-batch-size", "4", "--compile.enable",
                               "--moe.load_balance", "none"])
    assert got == {"training": {"steps": "5", "local_batch_size": "4"}, "compile": {"enable": "true"},
                   "moe": {"load_balance": "none"}}
    assert parse_cli_overrides([]) == {}


def test_cli_negative_number_is_a_value():
    """``--key -3`` reads -3 as the value (it does not start with --)."""
    assert parse_cli_overrides(["--training.steps", "-3"]) == {"training": {"steps": "-3"}}


def test_cli_optional_and_float_types():
    config = _load("--lr_scheduler.decay_ratio", "0.25", "--metrics.peak_flops", "1e12")
    assert config.lr_scheduler.decay_ratio == 0.25
    assert config.metrics.peak_flops == 1e12
    assert _load("--lr_scheduler.decay_ratio", "none").lr_scheduler.decay_ratio is None


def test_with_overrides_copy():
    base = JobConfig()
    changed = with_overrides(base, training={"steps": 3})
    assert changed.training.steps == 3 and base.training.steps == 60


# ---------------------------------------------------------------- errors


def _raises(match: str, *args: str) -> ValueError:
    with pytest.raises(ValueError, match=match) as info:
        _load(*args)
    return info.value


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_unknown_section():
    err = _raises(r"\[trainig\]", "--trainig.steps", "3")
    assert isinstance(err, ConfigError)
    assert "training" in str(err)  # did-you-mean hint


def test_unknown_key_did_you_mean():
    err = _raises(r"training\.stesp", "--training.stesp", "3")
    assert "Did you mean 'steps'" in str(err)


def test_unknown_key_in_toml(tmp_path):
    path = tmp_path / "bad_key.toml"
    path.write_text("[optimizer]\nlearning_rate = 0.1\n")
    _raises(r"optimizer\.learning_rate", "--job.config_file", str(path))


def test_wrong_type_int():
    err = _raises(r"training\.steps", "--training.steps", "abc")
    assert "integer" in str(err)


def test_wrong_type_in_toml(tmp_path):
    path = tmp_path / "bad_type.toml"
    path.write_text('[training]\nseq_len = "long"\n')
    _raises(r"training\.seq_len", "--job.config_file", str(path))


def test_wrong_type_bool():
    _raises(r"compile\.enable", "--compile.enable", "maybe")


def test_bad_literal_lists_allowed():
    err = _raises(r"disagmoe\.mode", "--disagmoe.mode", "foo")
    assert "colocated" in str(err) and "af_pipe" in str(err)


def test_bad_toml(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[training\nsteps = 3\n")
    err = _raises(r"job\.config_file", "--job.config_file", str(path))
    assert "TOML" in str(err)


def test_toml_top_level_key_not_a_table(tmp_path):
    path = tmp_path / "flat.toml"
    path.write_text("steps = 3\n")
    _raises(r"steps", "--job.config_file", str(path))


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.toml"
    err = _raises(r"job\.config_file", "--job.config_file", str(missing))
    assert "nope.toml" in str(err)


def test_negative_steps():
    _raises(r"training\.steps", "--training.steps", "-3")
    _raises(r"training\.steps", "--training.steps=0")


def test_jsonl_needs_dataset_path():
    _raises(r"training\.dataset_path", "--training.dataset", "jsonl")


def test_dataset_path_with_builtin_dataset():
    _raises(r"training\.dataset_path", "--training.dataset_path", "/tmp/x.jsonl")


def test_unparseable_argument():
    _raises(r"--section\.key", "steps=3")


# ---------------------------------------------------------------- validate


def _validate(world_size: int, *args: str) -> None:
    _load(*args).validate(world_size)


def test_validate_ok():
    _validate(2, "--job.config_file", str(DEBUG_TOML))
    _validate(1)
    _validate(8, "--parallelism.expert_parallel_degree", "8", "--parallelism.data_parallel_shard_degree", "8")


def test_validate_ep_must_divide_world_size():
    with pytest.raises(ValueError, match=r"parallelism\.expert_parallel_degree") as info:
        _validate(3, "--parallelism.expert_parallel_degree", "2")
    assert "NGPU = 3" in str(info.value)


def test_validate_ep_must_divide_experts():
    """The debug flavor has 8 experts; ep 3 divides 3 ranks but not the experts."""
    with pytest.raises(ValueError, match=r"parallelism\.expert_parallel_degree") as info:
        _validate(3, "--parallelism.expert_parallel_degree", "3")
    assert "8 experts" in str(info.value)


def test_validate_dp_shard_mismatch():
    with pytest.raises(ValueError, match=r"parallelism\.data_parallel_shard_degree"):
        _validate(4, "--parallelism.data_parallel_shard_degree", "2")


def test_validate_unknown_model_name():
    with pytest.raises(ValueError, match=r"model\.name") as info:
        _validate(1, "--model.name", "llama")
    assert "qwen3_moe" in str(info.value) and "deepseek_moe" in str(info.value)


def test_validate_unknown_flavor():
    with pytest.raises(ValueError, match=r"model\.flavor") as info:
        _validate(1, "--model.flavor", "7B")
    assert "30B-A3B" in str(info.value) and "debug" in str(info.value)


def test_validate_seq_len_exceeds_max():
    with pytest.raises(ValueError, match=r"training\.seq_len") as info:
        _validate(1, "--training.seq_len", "4096")
    assert "2048" in str(info.value)


def _af(*extra):
    return ("--disagmoe.mode", "af_pipe", *extra)


def test_validate_af_pipe_accepts_good_layouts():
    for a, f, p in [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (2, 2, 2), (4, 4, 4)]:
        _validate(a + f, *_af("--disagmoe.attention_ranks", str(a), "--disagmoe.expert_ranks", str(f),
                              "--disagmoe.pipeline_depth", str(p)))


@pytest.mark.parametrize("world,a,f,p,key", [
    (4, 2, 1, 1, "NGPU = 4"),                       # A + F != world
    (2, 0, 2, 1, "disagmoe.attention_ranks"),       # empty pool
    (3, 1, 2, 2, "disagmoe.attention_ranks = 1"),   # p does not divide A
    (3, 2, 1, 2, "disagmoe.expert_ranks = 1"),      # p does not divide F
    (6, 3, 3, 3, "4 layers"),                       # p does not divide L
    (10, 5, 5, 5, "exceeds the model's 4 layers"),  # p > L
    (4, 1, 3, 1, "8 experts"),                      # experts do not split over the group
])
def test_validate_bad_af_pipe_layouts(world, a, f, p, key):
    with pytest.raises(ValueError) as info:
        _validate(world, *_af("--disagmoe.attention_ranks", str(a), "--disagmoe.expert_ranks", str(f),
                              "--disagmoe.pipeline_depth", str(p)))
    assert key in str(info.value) and "disagmoe." in str(info.value)


def test_validate_pipeline_parallel_colocated_only():
    """Colocated runs pipeline with pipeline_parallel_degree; af_pipe pipelines its own way."""
    _validate(2, "--parallelism.pipeline_parallel_degree", "2")
    with pytest.raises(ValueError, match=r"parallelism\.pipeline_parallel_degree"):
        _validate(2, *_af("--disagmoe.attention_ranks", "1", "--disagmoe.expert_ranks", "1",
                          "--parallelism.pipeline_parallel_degree", "2"))


def test_expert_parallel_degree_minus_one_means_all_ranks():
    """The default job file uses -1 so it runs on NGPU 1, 2 or 4 unchanged."""
    config = _load("--job.config_file", str(DEBUG_TOML), "--disagmoe.mode", "colocated")
    assert config.parallelism.expert_parallel_degree == -1
    for world in (1, 2, 4):
        config.validate(world)
        assert config.expert_parallel_degree(world) == world
    with pytest.raises(ValueError, match=r"parallelism\.expert_parallel_degree = -2"):
        _load("--parallelism.expert_parallel_degree", "-2")


def test_single_rank_af_pipe_job_runs_the_reference():
    """One rank cannot hold two pools: the default (af_pipe) job on NGPU=1 is validated and
    run as the single-process reference on the same data."""
    config = _load("--job.config_file", str(DEBUG_TOML))
    assert config.disagmoe.mode == "af_pipe"
    config.validate(1)
    assert config.effective_mode(1) == "colocated" and config.effective_mode(2) == "af_pipe"


def test_validate_hsdp_degrees():
    with pytest.raises(ValueError, match=r"data_parallel_replicate_degree = 3 must divide the 4"):
        _validate(4, "--parallelism.data_parallel_replicate_degree", "3")
    with pytest.raises(ValueError, match=r"data_parallel_shard_degree = 4 x parallelism\.data_parallel_replicate_degree = 2"):
        _validate(4, "--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "4")
    _validate(4, "--parallelism.data_parallel_replicate_degree", "2")  # HSDP 2 x 2
    with pytest.raises(ValueError, match=r"HSDP\) is not supported with pipeline_parallel_degree"):
        _validate(4, "--parallelism.data_parallel_replicate_degree", "2", "--parallelism.pipeline_parallel_degree", "2")


def test_validate_mixed_precision():
    with pytest.raises(ValueError, match=r"training\.mixed_precision_param = 'float16' is not valid"):
        _validate(1, "--training.mixed_precision_param", "float16")
    with pytest.raises(ValueError, match=r"training\.mixed_precision_param = 'bfloat16' with pipeline parallelism"):
        _validate(2, "--training.mixed_precision_param", "bfloat16", "--parallelism.pipeline_parallel_degree", "2")
    _validate(2, "--training.mixed_precision_param", "bfloat16")
