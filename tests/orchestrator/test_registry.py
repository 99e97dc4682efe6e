"""The backend registry: one parser and one factory per type, options parsed once into frozen
objects, the factory's device checks, and the capabilities every backend answers."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import pytest

from orchestrator.backends.base import Backend, BackendType
from orchestrator.backends.diffusers import DiffusersBackend, DiffusersOptions
from orchestrator.backends.options import OptionError
from orchestrator.backends.registry import TYPES, backend_type, create_backend, parse_options
from orchestrator.backends.server import ServerBackend, ServerOptions
from orchestrator.backends.simulated import SimulatedBackend
from orchestrator.backends.tts import TtsOptions
from orchestrator.backends.vllm import VllmBackend, VllmOptions
from orchestrator.config import BACKENDS, parse_config
from orchestrator.device.base import DeviceReading
from orchestrator.device.simulated import SimulatedDevice
from orchestrator.errors import ConfigError
from orchestrator.spec import BackendOptions, ModelSpec

REPO = Path(__file__).resolve().parents[2]


def config_with(backend: str, device: str = "simulated") -> str:
    return f"""\
hardware: {{device: {device}, total_vram_gb: 16.0, safe_max_vram_gb: 15.5}}
models:
  m: {{kind: llm, vram_gb: 4, backend: {backend}}}
"""


class FakeGpu:
    """A stand-in for a real device (what NVML would be), for the factory's checks."""

    name = "Fake GPU"
    source = "nvml"
    total_bytes = 16 << 30

    def read(self) -> DeviceReading:
        return DeviceReading("nvml", self.total_bytes, 0, self.total_bytes, ())

    def used_bytes(self) -> int:
        return 0


def make(text: str, device: object) -> Backend:
    config = parse_config(text, source="<t>")
    return create_backend(config.models["m"], config=config, device=device, log_dir=Path("/tmp"))  # type: ignore[arg-type]


def test_every_type_is_registered_with_a_parser_and_a_factory() -> None:
    assert set(TYPES) == {
        "simulated", "synthetic", "server", "vllm", "diffusers", "tts",
        "ollama", "llamacpp_router", "comfyui", "sglang", "lmstudio",
    }  # fmt: skip
    assert BACKENDS == tuple(TYPES)  # the config accepts exactly the registered types
    for name in TYPES:
        t = backend_type(name)
        assert isinstance(t, BackendType) and callable(t.parse) and callable(t.create)
    with pytest.raises(KeyError, match="unknown backend type 'nope'"):
        backend_type("nope")


def test_importing_the_registry_and_parsing_every_type_imports_no_heavy_library() -> None:
    code = (
        "import sys\n"
        "from orchestrator.backends.registry import TYPES, backend_type\n"
        "from orchestrator.config import load_config\n"
        "load_config('configs/gpt-sovits-server.yaml')\n"
        "[backend_type(t) for t in TYPES]\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'vllm', 'numpy')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def test_options_are_parsed_once_into_frozen_objects(tmp_path: Path) -> None:
    text = f"""\
hardware: {{device: simulated, total_vram_gb: 16.0, safe_max_vram_gb: 15.5}}
models:
  s: {{kind: llm, vram_gb: 1}}
  srv: {{kind: llm, vram_gb: 1, backend: {{type: server, command: "x --port {{port}}", env: {{A: 1}}}}}}
  v: {{kind: llm, vram_gb: 1, backend: {{type: vllm, model: ~/q, sleep_level: 1, args: [--x]}}}}
  d: {{kind: sdxl, vram_gb: 1, backend: {{type: diffusers, path: {tmp_path}, lora: ~/l, steps: 4}}}}
  t: {{kind: tts, vram_gb: 1, backend: {{type: tts, path: {tmp_path}, dtype: float32}}}}
defaults: {{llm: s}}
"""
    models = parse_config(text, source="<t>").models
    assert type(models["s"].options) is BackendOptions
    srv = models["srv"].options
    assert isinstance(srv, ServerOptions)
    assert srv.command == ("x", "--port", "{port}") and srv.env == {"A": "1"}
    v = models["v"].options
    assert isinstance(v, VllmOptions)
    assert v.model == str(Path("~/q").expanduser()) and v.sleep_level == 1 and v.args == ("--x",)
    assert v.server.command is None and v.server.start_timeout_s == 300.0  # vLLM's longer default
    d = models["d"].options
    assert isinstance(d, DiffusersOptions)
    assert d.path == tmp_path and d.lora == Path("~/l").expanduser() and d.steps == 4 and d.dtype == "auto"
    t = models["t"].options
    assert isinstance(t, TtsOptions) and t.dtype == "float32"
    for spec in models.values():
        assert dataclasses.is_dataclass(spec.options)
        field = next(iter(dataclasses.fields(spec.options)), None)
        if field is not None:  # the option-less base has no field to assign
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(spec.options, field.name, None)
    with pytest.raises(TypeError):
        srv.env["B"] = "2"  # type: ignore[index]


def test_a_backend_takes_its_parsed_options_and_does_not_parse_again(tmp_path: Path) -> None:
    spec = parse_config(config_with(f"{{type: diffusers, path: {tmp_path}}}"), source="<t>").models["m"]
    backend = DiffusersBackend(spec, SimulatedDevice(16 << 30))
    assert backend.options is spec.options
    raw = dataclasses.replace(spec, options=MappingProxyType({"path": str(tmp_path)}))
    with pytest.raises(TypeError, match="parse_options"):
        DiffusersBackend(raw, SimulatedDevice(16 << 30))  # type: ignore[arg-type]


def test_a_spec_built_in_code_with_raw_options_is_parsed_by_the_factory(tmp_path: Path) -> None:
    config = parse_config(config_with("simulated"), source="<t>")
    spec = ModelSpec("m", "llm", 1 << 30, backend="server", options={"command": ["x"]})  # type: ignore[arg-type]
    backend = create_backend(spec, config=config, device=SimulatedDevice(16 << 30), log_dir=tmp_path)
    assert isinstance(backend, ServerBackend) and backend.options.command == ("x",)
    bad = dataclasses.replace(spec, options={"comand": ["x"]})  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="comand"):
        create_backend(bad, config=config, device=SimulatedDevice(16 << 30), log_dir=tmp_path)


def test_parse_options_names_the_key() -> None:
    with pytest.raises(OptionError) as info:
        parse_options("vllm", {"model": "/m", "args": ["--max-num-seqs", "many"]})
    assert info.value.key == "args" and "--max-num-seqs" in info.value.problem


def test_simulated_and_synthetic_take_no_options() -> None:
    for backend in ("{type: simulated, speed: 3}", "{type: synthetic, speed: 3}"):
        with pytest.raises(ConfigError) as info:
            parse_config(config_with(backend), source="<t>")
        assert info.value.key == "models.m.backend.speed" and "takes no options" in info.value.problem


def test_a_synthetic_model_on_the_simulated_device_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        make(config_with("synthetic"), SimulatedDevice(16 << 30))
    err = info.value
    assert (
        err.key == "models.m.backend"
        and "real CUDA memory" in err.problem
        and "backend: simulated" in err.fix
    )


def test_a_simulated_model_on_a_real_device_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        make(config_with("simulated", device="nvml"), FakeGpu())
    err = info.value
    assert err.key == "models.m.backend"
    assert "cannot run on the real device (nvml: Fake GPU)" in err.problem
    assert "hardware.device: simulated" in err.fix


def test_the_factory_makes_each_type(tmp_path: Path) -> None:
    sim = make(config_with("simulated"), SimulatedDevice(16 << 30))
    assert isinstance(sim, SimulatedBackend)
    srv = make(config_with("{type: server, command: [x]}"), SimulatedDevice(16 << 30))
    assert type(srv) is ServerBackend
    v = make(config_with("{type: vllm, model: /m}"), SimulatedDevice(16 << 30))
    assert isinstance(v, VllmBackend)
    d = make(
        config_with(f"{{type: diffusers, path: {tmp_path}}}").replace("llm", "sdxl"),
        SimulatedDevice(16 << 30),
    )
    assert isinstance(d, DiffusersBackend)


def test_capabilities_of_a_backend_without_a_server() -> None:
    b = make(config_with("simulated"), SimulatedDevice(16 << 30))
    assert b.url is None and b.served_model is None and b.pid is None and b.log_path is None
    assert not b.attached and not b.can_sleep and b.uptime_s == 0.0
    assert not b.is_alive()  # not loaded


def test_capabilities_of_server_backends() -> None:
    started = make(config_with("{type: server, command: [x], served_model: real}"), SimulatedDevice(16 << 30))
    assert started.served_model == "real" and not started.attached and not started.can_sleep
    assert started.url is None and started.pid is None  # nothing runs yet
    attached = make(config_with("{type: server, base_url: 'http://127.0.0.1:9/'}"), SimulatedDevice(16 << 30))
    assert attached.attached and attached.served_model == "m"  # the model's own name by default
    sleepy = make(config_with("{type: vllm, model: /m, sleep_level: 1}"), SimulatedDevice(16 << 30))
    assert sleepy.can_sleep and sleepy.served_model == "m"
    assert not make(config_with("{type: vllm, model: /m}"), SimulatedDevice(16 << 30)).can_sleep


def test_spec_is_a_leaf_and_backends_do_not_import_the_config_parser() -> None:
    def imports(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        return found

    spec_imports = imports(REPO / "orchestrator" / "spec.py")
    assert not {m for m in spec_imports if m.startswith("orchestrator")}, spec_imports
    for module in (REPO / "orchestrator" / "backends").glob("*.py"):
        assert "orchestrator.config" not in imports(module), module.name
