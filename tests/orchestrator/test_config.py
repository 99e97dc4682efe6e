"""Config parsing: the shipped configs carry the Model Management Module's figures, and every error
names the file, the key, the bad value and the fix."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from orchestrator.config import Config, RequestLimits, load_config, parse_config
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.runtime import Orchestrator
from states.scheduling import Mode
from states.units import gib_to_bytes

REPO = Path(__file__).resolve().parents[2]
SOURCE = "bad.yaml"

VALID = """\
hardware:
  device: simulated
  total_vram_gb: 16.0
  safe_max_vram_gb: 15.5
models:
  qwen-14b: {kind: llm, vram_gb: 11.5}
  sdxl-base: {kind: sdxl, vram_gb: 10.5}
"""


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text), source=SOURCE)


def config_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value


def assert_names(err: ConfigError, key: str, value: str, fix: str) -> None:
    """The message names the file, the key, the bad value and the fix."""
    msg = str(err)
    assert err.source == SOURCE
    assert err.key == key
    assert msg.startswith(f"{SOURCE}: {key}: " if key else f"{SOURCE}: "), msg
    assert value in err.problem, (value, err.problem)
    assert fix in err.fix, (fix, err.fix)
    assert err.problem in msg and err.fix in msg


# -- the shipped configs -----------------------------------------------------------------------


def check_design_figures(config: Config) -> None:
    assert config.device == "simulated"
    assert config.total_bytes == gib_to_bytes(16)
    assert config.budget_bytes == gib_to_bytes(15.5)
    sizes = {name: spec.vram_bytes for name, spec in config.models.items()}
    assert sizes == {
        "qwen-14b": gib_to_bytes(11.5),
        "qwen-vl-7b": gib_to_bytes(13.8),
        "qwen-coder-7b": gib_to_bytes(13.5),
        "sdxl-base": gib_to_bytes(10.5),
        "sdxl-lora": gib_to_bytes(11.5),
        "sdxl-lora-controlnet": gib_to_bytes(14.5),
        "gpt-sovits-small": gib_to_bytes(3.5),
    }
    kinds = {name: spec.kind for name, spec in config.models.items()}
    assert kinds["qwen-14b"] == "llm" and kinds["sdxl-base"] == "sdxl" and kinds["gpt-sovits-small"] == "tts"
    assert dict(config.defaults) == {"llm": "qwen-14b", "sdxl": "sdxl-base", "tts": "gpt-sovits-small"}
    assert config.exclusive_kinds == frozenset({"llm", "sdxl"})
    assert config.light_kinds == frozenset({"tts"})
    assert config.mode is Mode.FAIR
    sdxl = config.models["sdxl-base"]
    assert sdxl.offload and sdxl.host_bytes == gib_to_bytes(6.5)
    assert config.host_budget_bytes >= sdxl.host_bytes  # the host tier is on
    assert not config.models["qwen-14b"].offload
    assert config.resolve("llm") is config.models["qwen-14b"]
    assert config.resolve("sdxl-lora") is config.models["sdxl-lora"]
    assert config.resolve("vision") is None


def test_the_embedded_default_has_the_design_documents_figures() -> None:
    config = load_config(None)
    check_design_figures(config)
    assert "simulated-16gb.yaml" in config.source


def test_configs_simulated_16gb_has_the_design_documents_figures() -> None:
    path = REPO / "configs" / "simulated-16gb.yaml"
    config = load_config(path)
    check_design_figures(config)
    assert config.source == str(path)
    assert load_config(str(path)) == config


def test_the_embedded_default_builds_an_orchestrator() -> None:
    orch = Orchestrator.from_config()
    assert set(orch.backends) == set(orch.config.models)
    assert orch.device.total_bytes == gib_to_bytes(16)


def test_a_kind_with_a_single_model_defaults_to_it() -> None:
    config = parse(VALID)
    assert dict(config.defaults) == {"llm": "qwen-14b", "sdxl": "sdxl-base"}
    assert config.resolve("llm") is config.models["qwen-14b"]


def test_a_kind_with_several_models_and_no_default_has_none() -> None:
    config = parse(VALID + "  sdxl-lora: {kind: sdxl, vram_gb: 11.5}\n")
    assert "sdxl" not in config.defaults
    assert config.resolve("sdxl") is None
    assert config.defaults["llm"] == "qwen-14b"


def test_an_explicit_default_wins_over_the_single_model_rule() -> None:
    config = parse(VALID + "  sdxl-lora: {kind: sdxl, vram_gb: 11.5}\ndefaults: {sdxl: sdxl-lora}\n")
    assert config.defaults["sdxl"] == "sdxl-lora"


def test_optional_keys_take_their_defaults() -> None:
    config = parse(
        "hardware: {device: simulated, safe_max_vram_gb: 15.5}\nmodels: {q: {kind: llm, vram_gb: 1}}\n"
    )
    assert config.total_bytes == config.budget_bytes == gib_to_bytes(15.5)
    assert config.mode is Mode.FAIR
    assert (config.fairness_s, config.max_wait_s) == (5.0, 300.0)
    assert config.host_budget_bytes == 0
    assert config.time_scale == 1.0
    spec = config.models["q"]
    assert (spec.confidence, spec.backend, spec.offload) == ("medium", "simulated", False)
    assert spec.host_bytes == spec.vram_bytes


def test_config_error_is_a_value_error_and_a_runtime_error() -> None:
    err = config_error("[1, 2]")
    assert isinstance(err, ValueError)
    assert isinstance(err, RuntimeError)
    assert isinstance(err, OrchestratorError)


# -- errors ------------------------------------------------------------------------------------


def test_malformed_yaml_names_the_line_and_column() -> None:
    err = config_error("hardware:\n  safe_max_vram_gb: [15.5\nmodels: {}\n")
    assert err.key.startswith("line 3, column "), err.key
    assert "malformed YAML" in err.problem
    assert_names(err, err.key, "malformed YAML", "fix the YAML syntax")


def test_a_top_level_that_is_not_a_mapping() -> None:
    assert_names(config_error("- hardware\n- models\n"), "", "got list", "simulated-16gb.yaml")


def test_an_empty_file() -> None:
    assert_names(config_error(""), "", "got nothing", "simulated-16gb.yaml")


def test_an_unknown_top_level_key() -> None:
    err = config_error(VALID + "hardwere: {}\n")
    assert_names(err, "hardwere", "unknown key", "hardware, switching, models, defaults, simulation")


def test_an_unknown_model_key() -> None:
    err = config_error(VALID + "  tts: {kind: tts, vram_gb: 3.5, colour: blue}\n")
    assert_names(err, "models.tts.colour", "unknown key", "vram_gb")


def test_an_unknown_kind() -> None:
    err = config_error(VALID + "  clip: {kind: vision, vram_gb: 1}\n")
    assert_names(err, "models.clip.kind", "'vision'", "use one of: llm, sdxl, tts")


def test_a_kind_in_neither_the_heavy_nor_the_light_list() -> None:
    err = config_error(VALID + "switching: {heavy_models: [llm], light_models: [tts]}\n")
    assert_names(err, "models.sdxl-base.kind", "'sdxl'", "list the kind in one of them")
    assert "heavy_models" in err.problem and "light_models" in err.problem


def test_a_kind_listed_as_heavy_and_light() -> None:
    err = config_error(VALID + "switching: {heavy_models: [llm, sdxl], light_models: [sdxl, tts]}\n")
    assert_names(err, "switching.light_models", "['sdxl']", "list each kind once")


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("-1", "-1"),
        ("0", "0"),
        ("0.0", "0.0"),
        ("lots", "'lots'"),
        ("true", "True"),
        (".nan", "nan"),
        (".inf", "inf"),
        ("[15]", "[15]"),
    ],
)
def test_a_bad_budget(value: str, shown: str) -> None:
    err = config_error(VALID.replace("safe_max_vram_gb: 15.5", f"safe_max_vram_gb: {value}"))
    assert_names(err, "hardware.safe_max_vram_gb", shown, "")
    assert "number" in err.fix or "positive" in err.fix, err.fix


def test_a_missing_budget() -> None:
    err = config_error(VALID.replace("  safe_max_vram_gb: 15.5\n", ""))
    assert_names(err, "hardware.safe_max_vram_gb", "missing", "e.g. 15.5")


def test_a_missing_hardware_section() -> None:
    assert_names(config_error("models: {q: {kind: llm, vram_gb: 1}}\n"), "hardware", "missing", "hardware:")


def test_a_safe_max_above_the_total() -> None:
    err = config_error(VALID.replace("safe_max_vram_gb: 15.5", "safe_max_vram_gb: 17"))
    assert_names(
        err,
        "hardware.safe_max_vram_gb",
        "17.00 GiB is more than total_vram_gb (16.00 GiB)",
        "at or below total_vram_gb",
    )


def test_an_estimate_larger_than_the_budget_names_the_shortfall() -> None:
    err = config_error(VALID + "  qwen-72b: {kind: llm, vram_gb: 40}\n")
    assert_names(err, "models.qwen-72b.vram_gb", "40.00 GiB", "raise hardware.safe_max_vram_gb")
    assert "15.50 GiB" in err.problem
    assert "short 24.50 GiB" in err.problem


def test_an_estimate_equal_to_the_budget_is_accepted() -> None:
    config = parse(VALID + "  big: {kind: llm, vram_gb: 15.5}\n")
    assert config.models["big"].vram_bytes == config.budget_bytes


def test_a_missing_estimate() -> None:
    err = config_error(VALID + "  tts: {kind: tts}\n")
    assert_names(err, "models.tts.vram_gb", "missing", "vram_gb: 11.5")


def test_a_non_numeric_estimate() -> None:
    err = config_error(VALID + "  tts: {kind: tts, vram_gb: 3.5GB}\n")
    assert_names(err, "models.tts.vram_gb", "'3.5GB'", "number")


def test_a_default_naming_no_model() -> None:
    err = config_error(VALID + "defaults: {llm: qwen-15b}\n")
    assert_names(err, "defaults.llm", "'qwen-15b' names no configured model", "qwen-14b, sdxl-base")


def test_a_default_naming_a_model_of_another_kind() -> None:
    err = config_error(VALID + "defaults: {llm: sdxl-base}\n")
    assert_names(err, "defaults.llm", "'sdxl-base' is of kind 'sdxl', not 'llm'", "kind 'llm'")


def test_a_default_for_an_unknown_kind() -> None:
    err = config_error(VALID + "defaults: {vision: qwen-14b}\n")
    assert_names(err, "defaults.vision", "'vision'", "llm, sdxl, tts")


def test_defaults_that_are_not_a_mapping() -> None:
    err = config_error(VALID + "defaults: [qwen-14b]\n")
    assert_names(err, "defaults", "got list", "llm: qwen-14b")


def test_a_default_that_is_a_list() -> None:
    err = config_error(VALID + "defaults: {llm: [qwen-14b]}\n")
    assert_names(err, "defaults.llm", "['qwen-14b']", "qwen-14b, sdxl-base")


def test_a_budget_too_large_for_a_float() -> None:
    huge = "1" + "0" * 400
    err = config_error(VALID.replace("safe_max_vram_gb: 15.5", f"safe_max_vram_gb: {huge}"))
    assert err.key == "hardware.safe_max_vram_gb"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (VALID + "defaults: 0\n", "defaults"),
        (VALID + "defaults: false\n", "defaults"),
        (VALID + "  tts: {kind: tts, vram_gb: 3.5, simulation: 0}\n", "models.tts.simulation"),
    ],
    ids=["defaults-0", "defaults-false", "model-simulation-0"],
)
def test_a_falsy_value_where_a_mapping_belongs(text: str, key: str) -> None:
    err = config_error(text)
    assert_names(err, key, "expected a mapping", "")


def test_fairness_longer_than_max_wait() -> None:
    err = config_error(VALID + "switching: {fairness_s: 30, max_wait_s: 10}\n")
    assert_names(
        err, "switching.fairness_s", "30 s is longer than max_wait_s (10 s)", "at or below max_wait_s"
    )


def test_fairness_equal_to_max_wait_is_accepted() -> None:
    config = parse(VALID + "switching: {fairness_s: 10, max_wait_s: 10}\n")
    assert config.fairness_s == config.max_wait_s == 10.0


def test_a_bad_scheduling_mode() -> None:
    err = config_error(VALID + "switching: {scheduling: round_robin}\n")
    assert_names(err, "switching.scheduling", "'round_robin'", "use one of: fair, fcfs, resident_first")


@pytest.mark.parametrize("mode", list(Mode))
def test_every_scheduling_mode_is_accepted(mode: Mode) -> None:
    assert parse(VALID + f"switching: {{scheduling: {mode.value}}}\n").mode is mode


@pytest.mark.parametrize("key", ["max_wait_s", "load_timeout_s", "unload_timeout_s"])
def test_a_timeout_must_be_positive(key: str) -> None:
    err = config_error(VALID + f"switching: {{{key}: 0}}\n")
    assert_names(err, f"switching.{key}", "greater than 0, got 0", "")


def test_an_unknown_switching_key() -> None:
    err = config_error(VALID + "switching: {fairnes_s: 1}\n")
    assert_names(err, "switching.fairnes_s", "unknown key", "fairness_s")


def test_a_bad_device() -> None:
    err = config_error(VALID.replace("device: simulated", "device: tpu"))
    assert_names(err, "hardware.device", "'tpu'", "auto, nvml, torch, simulated")


def test_a_negative_gpu_index() -> None:
    err = config_error(VALID.replace("device: simulated", "device: simulated\n  index: -1"))
    assert_names(err, "hardware.index", "-1", "use 0")


def test_no_models() -> None:
    err = config_error(VALID.split("models:")[0] + "models: {}\n")
    assert_names(err, "models", "got dict", "add at least one model")


def test_a_model_that_is_not_a_mapping() -> None:
    assert_names(config_error(VALID + "  tts: 3.5\n"), "models.tts", "got float", "kind and vram_gb")


def test_an_offload_that_is_not_a_boolean() -> None:
    err = config_error(VALID + "  tts: {kind: tts, vram_gb: 3.5, offload: yes please}\n")
    assert_names(err, "models.tts.offload", "'yes please'", "true keeps a host-RAM copy")


def test_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    err = info.value
    assert err.source == str(missing)
    assert "file not found" in err.problem
    assert "check the path" in err.fix
    assert "--config" not in str(err)  # raised from Python too, where there is no --config
    assert str(err).startswith(str(missing))


def test_a_config_file_names_itself_in_its_errors(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(VALID + "defaults: {llm: nope}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert str(info.value).startswith(f"{path}: defaults.llm: ")


def test_a_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert "cannot read it" in info.value.problem


def test_a_device_the_orchestrator_cannot_drive_is_a_config_error() -> None:
    config = parse(VALID.replace("device: simulated", "device: nvml"))
    with pytest.raises(ConfigError) as info:
        Orchestrator(config)
    assert info.value.key == "hardware.device"
    assert "'nvml'" in info.value.problem
    assert "device: simulated" in info.value.fix


# -- max_concurrent and limits -------------------------------------------------------------------


def with_model(body: str) -> str:
    return VALID + f"  m: {body}\n"


def test_max_concurrent_defaults_per_backend(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    cfg = parse(
        with_model("{kind: sdxl, vram_gb: 1, backend: {type: diffusers, path: %s}}" % (tmp_path / "p"))
        + f"  t: {{kind: tts, vram_gb: 1, backend: {{type: tts, path: {tmp_path / 'p'}}}}}\n"
        + "  srv: {kind: llm, vram_gb: 1, backend: {type: server, command: [x]}}\n"
        + "  v: {kind: llm, vram_gb: 1, backend: {type: vllm, model: /m}}\n"
        + "  v8: {kind: llm, vram_gb: 1, backend: {type: vllm, model: /m, args: [--max-num-seqs, '8']}}\n"
        + "  v9: {kind: llm, vram_gb: 1, backend: {type: vllm, model: /m, args: [--max-num-seqs=9]}}\n"
    )
    assert cfg.models["m"].max_concurrent == 1
    assert cfg.models["t"].max_concurrent == 1
    assert cfg.models["srv"].max_concurrent is None
    assert cfg.models["qwen-14b"].max_concurrent is None  # simulated
    assert cfg.models["v"].max_concurrent == 128  # the simulated device: vLLM's CPU build
    assert cfg.models["v8"].max_concurrent == 8
    assert cfg.models["v9"].max_concurrent == 9


def test_vllm_max_concurrent_follows_the_gpu() -> None:
    vllm = "{kind: llm, vram_gb: 10, backend: {type: vllm, model: /m}}"
    small = parse(with_model(vllm).replace("device: simulated", "device: auto"))
    assert small.models["m"].max_concurrent == 256
    big = with_model(vllm).replace("device: simulated", "device: auto")
    big = big.replace("total_vram_gb: 16.0", "total_vram_gb: 141.0")
    assert parse(big).models["m"].max_concurrent == 1024
    a100 = big.replace("hardware:\n", "hardware:\n  gpu_name: NVIDIA A100-SXM4-80GB\n")
    assert parse(a100).models["m"].max_concurrent == 256


def test_max_concurrent_set_or_unlimited() -> None:
    cfg = parse(
        with_model("{kind: llm, vram_gb: 1, max_concurrent: 3}")
        + "  u: {kind: llm, vram_gb: 1, max_concurrent: null, backend: {type: vllm, model: /m}}\n"
    )
    assert cfg.models["m"].max_concurrent == 3
    assert cfg.models["u"].max_concurrent is None


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "true", "lots"])
def test_a_bad_max_concurrent(value: str) -> None:
    err = config_error(with_model(f"{{kind: llm, vram_gb: 1, max_concurrent: {value}}}"))
    assert_names(err, "models.m.max_concurrent", "expected a whole number >= 1 or null", "max_concurrent: 1")


def test_limits_default_and_set() -> None:
    cfg = parse(
        with_model("{kind: sdxl, vram_gb: 1, limits: {max_steps: 20, max_width: 512, max_tokens: 512}}")
    )
    limits = cfg.models["m"].limits
    assert (limits.max_steps, limits.max_width, limits.max_height, limits.max_tokens) == (20, 512, 1024, 512)
    default = cfg.models["qwen-14b"].limits
    assert default == RequestLimits()
    assert (default.max_input_chars, default.max_steps, default.max_n, default.max_tokens) == (
        4096,
        50,
        4,
        None,
    )
    assert (default.max_width, default.max_height) == (1024, 1024)


def test_limits_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RequestLimits().max_n = 10  # type: ignore[misc]


def test_an_unknown_limit() -> None:
    err = config_error(with_model("{kind: sdxl, vram_gb: 1, limits: {max_stepz: 20}}"))
    assert_names(err, "models.m.limits.max_stepz", "unknown key", "max_steps")


@pytest.mark.parametrize(
    ("key", "value"), [("max_steps", "0"), ("max_n", "2.5"), ("max_width", "wide"), ("max_tokens", "-5")]
)
def test_a_bad_limit(key: str, value: str) -> None:
    err = config_error(with_model(f"{{kind: sdxl, vram_gb: 1, limits: {{{key}: {value}}}}}"))
    assert_names(err, f"models.m.limits.{key}", "expected a whole number >= 1", "whole number of at least 1")


def test_limits_that_are_not_a_mapping() -> None:
    err = config_error(with_model("{kind: sdxl, vram_gb: 1, limits: 5}"))
    assert_names(err, "models.m.limits", "expected a mapping", "max_steps")


def test_default_steps_above_the_step_limit() -> None:
    model = (
        "{kind: sdxl, vram_gb: 1, limits: {max_steps: 10}, backend: {type: diffusers, path: /p, steps: 30}}"
    )
    err = config_error(with_model(model))
    assert_names(err, "models.m.backend.steps", "more than limits.max_steps (10)", "raise limits.max_steps")
