"""Every config in docs/recipes.md parses, with the backend types it says, and its Python runs
through the compiler: a recipe that drifts from the code fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator import parse_config
from orchestrator.backends.cooperative_options import CooperativeOptions

RECIPES = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"
BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)


def blocks(lang: str) -> list[str]:
    return [body for kind, body in BLOCK.findall(RECIPES.read_text()) if kind == lang]


def test_the_recipes_have_their_configs() -> None:
    text = RECIPES.read_text()
    assert "## Ollama + ComfyUI on one 12 GB card" in text
    assert "## llama.cpp router + SDXL in Python" in text
    assert len(blocks("yaml")) == 3 and len(blocks("python")) == 1


@pytest.mark.parametrize("index", range(3))
def test_every_config_block_parses(index: int) -> None:
    config = parse_config(blocks("yaml")[index], source=f"docs/recipes.md yaml block {index + 1}")
    types = {spec.backend for spec in config.models.values()}
    assert types & {"ollama", "comfyui", "llamacpp_router"}
    for spec in config.models.values():
        if spec.backend in ("ollama", "comfyui", "llamacpp_router"):
            assert isinstance(spec.options, CooperativeOptions)
    for kind, name in config.defaults.items():
        assert config.models[name].kind == kind


def test_the_started_programs_get_the_settings_that_keep_them_from_evicting_on_their_own() -> None:
    ollama_comfy = parse_config(blocks("yaml")[1], source="started")
    o = ollama_comfy.models["qwen"].options
    assert isinstance(o, CooperativeOptions) and o.server.env is not None
    assert o.server.env["OLLAMA_KEEP_ALIVE"] == "-1" and o.server.env["OLLAMA_HOST"] == "{host}:{port}"
    router = parse_config(blocks("yaml")[2], source="router").models["qwen-7b"].options
    assert isinstance(router, CooperativeOptions) and router.server.command is not None
    cmd = list(router.server.command)
    assert cmd[:1] == ["llama-server"] and "--no-models-autoload" in cmd
    assert cmd[cmd.index("--models-max") + 1] == "0" and "--ctx-size" in cmd


def test_the_python_recipe_compiles() -> None:
    compile(blocks("python")[0], "docs/recipes.md python block", "exec")
