"""Programs people already run (Ollama, llama.cpp's router, ComfyUI, SGLang) on one card with
the orchestrator's own models.

Each test runs the strict fake of a program (``tests/fixtures/fake_programs.py``) as a real
process, either started by the orchestrator (``command``) or by the test and attached to
(``url``), with its memory on the shared simulated device by the pid that holds it in the real
program (``tests/fixtures/shared_device.py``): the release is verified on the device, by pid,
as NVML verifies it on a GPU. Every test ends with no process of a fake left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from orchestrator import BackendCrashed, ConfigError, Orchestrator, VRAMNotReleased, parse_config
from orchestrator.backends.cooperative import CooperativeBackend
from orchestrator.backends.ollama import model_blob, runs_blob
from orchestrator.backends.procs import cmdline, listening_pid, with_descendants
from orchestrator.backends.server import free_port
from orchestrator.config import Config
from states.ledger import Tier
from states.units import GIB
from tests.fixtures.shared_device import SharedSimulatedDevice, alive_after, process_alive
from tests.orchestrator.conftest import config_yaml, wait_until

pytestmark = pytest.mark.anyio

FAKES = str(Path(__file__).resolve().parents[1] / "fixtures" / "fake_programs.py")
SWITCHING = {"load_timeout_s": 20.0, "unload_timeout_s": 3.0, "retry_backoff_s": 0.05, "max_wait_s": 10.0}
SDXL = {"kind": "sdxl", "vram_gb": 10.5}
BUDGET = int(15.5 * GIB)


@dataclass
class Fake:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def processes(self) -> set[int]:
        return with_descendants([self.proc.pid])

    async def get(self, path: str) -> Any:
        return (await http("GET", self.url + path)).json()


async def http(method: str, url: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.request(method, url, **kwargs)


class Fakes:
    """Fake programs the test starts itself (to attach to), each in its own process group,
    all killed at the end."""

    def __init__(self, device: SharedSimulatedDevice, tmp: Path) -> None:
        self.device, self.tmp, self.started = device, tmp, []  # type: list[Fake]
        self.pids: set[int] = set()

    def start(self, program: str, *args: str, port: int | None = None) -> Fake:
        port = port or free_port()
        log = self.tmp / f"{program}-{port}-{len(self.started)}.log"
        cmd = [
            sys.executable,
            FAKES,
            program,
            "--port",
            str(port),
            "--device-socket",
            str(self.device.socket_path),
        ]
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [*cmd, *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        fake = Fake(proc, port, log)
        self.started.append(fake)
        deadline = time.monotonic() + 15
        while listening_pid("127.0.0.1", port) != proc.pid:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"fake {program} did not start: {log.read_text()}")
            time.sleep(0.02)
        return fake

    def kill(self, fake: Fake) -> set[int]:
        """SIGKILL the fake's whole process group (a restart, an OOM kill); its pids."""
        pids = fake.processes()
        self.pids |= pids
        os.killpg(fake.pid, signal.SIGKILL)
        fake.proc.wait()
        return pids

    def close(self) -> None:
        for fake in self.started:
            if fake.proc.poll() is None:
                self.kill(fake)


@pytest.fixture
def device() -> Iterator[SharedSimulatedDevice]:
    folder = Path(tempfile.mkdtemp(prefix="vo-dev-"))  # a short path: Unix sockets allow ~100 bytes
    dev = SharedSimulatedDevice(16 * GIB, folder / "gpu.sock")
    yield dev
    dev.close()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def fakes(device: SharedSimulatedDevice, tmp_path: Path) -> Iterator[Fakes]:
    f = Fakes(device, tmp_path)
    yield f
    f.close()
    leftovers = alive_after(f.pids, within_s=10)
    assert not leftovers, f"processes of the fakes still alive: {leftovers}"


def make_config(models: dict[str, dict[str, Any]], **switching: Any) -> Config:
    text = "".join(f"{name}: {json.dumps(spec)}\n" for name, spec in models.items())
    yaml_text = config_yaml(text, None, **{**SWITCHING, **switching}) + "monitor: {sample_hz: 0}\n"
    return parse_config(yaml_text, source="<cooperative test config>")


def make_orch(
    device: SharedSimulatedDevice, models: dict[str, dict[str, Any]], **switching: Any
) -> Orchestrator:
    return Orchestrator(make_config(models, **switching), device=device)


def ollama_model(url: str | None = None, **backend: Any) -> dict[str, Any]:
    where: dict[str, Any] = {"url": url} if url else {}
    return {
        "kind": "llm",
        "vram_gb": 9.5,
        "backend": {"type": "ollama", "model": "qwen2.5:7b", "poll_s": 0.05, **where, **backend},
    }


def cooperative(orch: Orchestrator, name: str) -> CooperativeBackend:
    b = orch.backends[name]
    assert isinstance(b, CooperativeBackend)
    return b


def runner_pids(fake: Fake) -> set[int]:
    return fake.processes() - {fake.pid}


# -- Ollama ------------------------------------------------------------------------------------


async def test_ollama_gives_its_model_back_when_sdxl_needs_the_card(
    device: SharedSimulatedDevice, fakes: Fakes
) -> None:
    ol = fakes.start("ollama", "--models", "qwen2.5:7b=9.0", "--unload-s", "0.1")
    orch = make_orch(device, {"qwen": ollama_model(ol.url), "sdxl-base": SDXL})
    events: list[Any] = []
    orch.add_listener(events.append)
    async with orch:
        async with orch.acquire("qwen") as lease:
            assert lease.handle.base_url == ol.url
            ps = (await ol.get("/api/ps"))["models"]
            assert [m["name"] for m in ps] == ["qwen2.5:7b"]
            assert ps[0]["expires_at"].startswith("2318")  # keep_alive -1: never on its own timer
            (runner,) = runner_pids(ol)
            assert device.held_by_pid(runner) == 9 * GIB
            assert cooperative(orch, "qwen").measured_bytes() == 9 * GIB
            assert cooperative(orch, "qwen").pid == ol.pid
        async with orch.acquire("sdxl-base"):
            # Ollama was asked to unload, and its runner's memory was seen gone first.
            assert (await ol.get("/api/ps"))["models"] == []
            assert not process_alive(runner) and device.held_by_pid(runner) == 0
            assert orch.ledger().get("qwen") is None
        evict = [e for e in events if e.kind == "evict" and e.model == "qwen"]
        assert evict and "for sdxl-base" in (evict[0].detail or "")
        assert device.peak_bytes <= BUDGET
        # And back: the orchestrator reloads it through Ollama's own API.
        async with orch.acquire("qwen"):
            assert [m["name"] for m in (await ol.get("/api/ps"))["models"]] == ["qwen2.5:7b"]
    # Attached: the orchestrator unloaded its model at shutdown and left Ollama running.
    assert ol.proc.poll() is None and (await ol.get("/api/ps"))["models"] == []


async def test_the_openai_client_reaches_ollama_through_the_capabilities(
    device: SharedSimulatedDevice, fakes: Fakes
) -> None:
    """What the gateway uses (``url``, ``served_model``, the lease's client): an ``openai``
    client on them gets Ollama's OpenAI-compatible answer while the lease holds the model."""
    openai = pytest.importorskip("openai")
    ol = fakes.start("ollama", "--models", "qwen2.5:7b=9.0")
    orch = make_orch(device, {"qwen": ollama_model(ol.url)})
    async with orch:
        b = cooperative(orch, "qwen")
        assert (b.url, b.served_model) == (ol.url, "qwen2.5:7b")
        async with orch.acquire("qwen"):
            client = openai.AsyncOpenAI(base_url=f"{b.url}/v1", api_key="unused", max_retries=0)
            reply = await client.chat.completions.create(
                model=b.served_model, messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content == "echo: hi"
            await client.close()


async def test_an_ollama_that_ignores_the_release_fails_closed(
    device: SharedSimulatedDevice, fakes: Fakes
) -> None:
    ol = fakes.start("ollama", "--models", "qwen2.5:7b=9.0", "--ignore-release")
    orch = make_orch(device, {"qwen": ollama_model(ol.url), "sdxl-base": SDXL})
    async with orch:
        async with orch.acquire("qwen"):
            (runner,) = runner_pids(ol)
        with pytest.raises(VRAMNotReleased) as ei:
            async with orch.acquire("sdxl-base", timeout=15):
                pytest.fail("sdxl was loaded although Ollama kept its memory")
        msg = str(ei.value)
        assert ei.value.model == "qwen"
        assert f"ollama at {ol.url} (pid {ol.pid}; its processes" in msg and str(runner) in msg
        assert "still lists the model in /api/ps" in msg and "9.00 GiB" in msg
        # The budget held: the model is still counted, nothing else was loaded.
        r = orch.ledger().get("qwen")
        assert r is not None and r.tier is Tier.GPU
        assert device.held_by("sdxl-base") == 0 and device.peak_bytes <= BUDGET
    assert device.held_by_pid(runner) == 9 * GIB  # (the fake still holds it: it ignores us)


async def test_ollama_restarting_underneath_a_lease(device: SharedSimulatedDevice, fakes: Fakes) -> None:
    ol = fakes.start("ollama", "--models", "qwen2.5:7b=9.0")
    orch = make_orch(device, {"qwen": ollama_model(ol.url), "sdxl-base": SDXL})
    async with orch:
        with pytest.raises(BackendCrashed) as ei:
            async with orch.acquire("qwen"):
                old = fakes.kill(ol)  # `systemctl restart ollama`, or the OOM killer
                await anyio.sleep(10)
                pytest.fail("the lease outlived the program that held its model")
        assert f"ollama at {ol.url}" in str(ei.value)
        assert orch.ledger().get("qwen") is None and not cooperative(orch, "qwen").is_loaded()
        assert all(device.held_by_pid(p) == 0 for p in old)  # its memory went with it
        again = fakes.start("ollama", "--models", "qwen2.5:7b=9.0", port=ol.port)
        async with orch.acquire("qwen", timeout=10):  # it waits out the crash's back-off
            assert cooperative(orch, "qwen").pid == again.pid
            assert [m["name"] for m in (await again.get("/api/ps"))["models"]] == ["qwen2.5:7b"]


async def test_a_model_unloaded_in_ollama_by_hand_leaves_the_ledger(
    device: SharedSimulatedDevice, fakes: Fakes
) -> None:
    ol = fakes.start("ollama", "--models", "qwen2.5:7b=9.0")
    orch = make_orch(device, {"qwen": ollama_model(ol.url)})
    async with orch:
        async with orch.acquire("qwen"):
            pass
        assert orch.ledger().get("qwen") is not None
        await http(
            "POST", ol.url + "/api/generate", json={"model": "qwen2.5:7b", "keep_alive": 0}
        )  # `ollama stop`
        await wait_until(lambda: orch.ledger().get("qwen") is None, within=5, what="qwen left the ledger")
        assert not cooperative(orch, "qwen").is_loaded()


async def test_ollama_started_by_the_orchestrator_never_unloads_on_its_own(
    device: SharedSimulatedDevice, fakes: Fakes, tmp_path: Path
) -> None:
    cmd = [
        sys.executable,
        FAKES,
        "ollama",
        "--device-socket",
        str(device.socket_path),
        "--models",
        "qwen2.5:7b=9.0",
    ]
    orch = make_orch(device, {"qwen": ollama_model(command=cmd, log_dir=str(tmp_path), stop_grace_s=1)})
    async with orch:
        async with orch.acquire("qwen"):
            b = cooperative(orch, "qwen")
            pid = b.pid
            assert pid is not None and not b.attached
            fakes.pids |= with_descendants([pid])
            log = (tmp_path / "qwen.log").read_text()
            assert "OLLAMA_KEEP_ALIVE='-1'" in log  # it read the orchestrator's setting
            assert b.url is not None and listening_pid("127.0.0.1", int(b.url.rsplit(":", 1)[1])) == pid
    assert not process_alive(pid)  # started by us: stopped with us


async def test_an_ollama_the_orchestrator_started_crashing_is_started_again(
    device: SharedSimulatedDevice, fakes: Fakes, tmp_path: Path
) -> None:
    cmd = [
        sys.executable,
        FAKES,
        "ollama",
        "--device-socket",
        str(device.socket_path),
        "--models",
        "qwen2.5:7b=9.0",
    ]
    orch = make_orch(device, {"qwen": ollama_model(command=cmd, log_dir=str(tmp_path), stop_grace_s=1)})
    async with orch:
        with pytest.raises(BackendCrashed) as ei:
            async with orch.acquire("qwen"):
                pid = cooperative(orch, "qwen").pid
                assert pid is not None
                fakes.pids |= with_descendants([pid])
                os.killpg(pid, signal.SIGKILL)  # the OOM killer takes Ollama and its runners
                await anyio.sleep(10)
                pytest.fail("the lease outlived the program that held its model")
        assert f"(pid {pid}" in str(ei.value) and "exited with code -9" in str(ei.value)
        assert orch.ledger().get("qwen") is None
        async with orch.acquire("qwen", timeout=10):  # it waits out the crash's back-off
            again = cooperative(orch, "qwen").pid
            assert again is not None and again != pid
            fakes.pids |= with_descendants([again])
    assert not process_alive(again)


async def test_ollama_options_are_checked(device: SharedSimulatedDevice) -> None:
    with pytest.raises(ConfigError, match=r"backend\.model: missing"):
        make_config(
            {"q": {"kind": "llm", "vram_gb": 1, "backend": {"type": "ollama", "url": "http://127.0.0.1:1"}}}
        )
    with pytest.raises(ConfigError, match=r"env\.OLLAMA_KEEP_ALIVE: set by the orchestrator"):
        make_config({"q": ollama_model(env={"OLLAMA_KEEP_ALIVE": "5m"})})
    with pytest.raises(ConfigError, match=r"url: give url .* or command"):
        make_config({"q": ollama_model("http://127.0.0.1:1", command=["ollama", "serve"])})
    with pytest.raises(ConfigError, match=r"backend\.url: expected http://host:port"):
        make_config({"q": ollama_model("127.0.0.1:11434")})
    with pytest.raises(ConfigError, match=r"release_timeout_s: 5 s is not shorter"):
        make_orch(device, {"q": ollama_model("http://127.0.0.1:1", release_timeout_s=5)})


def test_an_ollama_model_is_told_by_the_blob_its_runner_loads() -> None:
    """``/api/ps``'s digest is the manifest's; the runner's ``--model`` is the weights' blob,
    which the Modelfile of ``/api/show`` names in its first ``FROM`` (a projector comes after)."""
    weights, projector = "sha256-" + "a" * 64, "sha256-" + "b" * 64
    modelfile = (
        '# Modelfile generated by "ollama show"\n# To build a new Modelfile based on this, replace '
        f"FROM with:\n# FROM llava:7b\n\nFROM /usr/share/ollama/.ollama/models/blobs/{weights}\n"
        f"FROM /usr/share/ollama/.ollama/models/blobs/{projector}\nPARAMETER stop </s>\n"
    )
    assert model_blob(modelfile) == weights
    assert model_blob("# FROM qwen2.5:7b\nFROM qwen3-mlx\n") is None  # not run from a blob
    assert model_blob("") is None
    runner = ["/usr/bin/ollama", "runner", "--ollama-engine", "--model", f"/m/blobs/{weights}", "--port", "4"]
    llama_server = ["/usr/lib/ollama/llama-server", "--model", f"/m/blobs/{weights}", "--mmproj",
                    f"/m/blobs/{projector}", "--port", "5"]  # fmt: skip
    assert runs_blob(runner, weights) and runs_blob(llama_server, weights)
    assert not runs_blob(llama_server, projector)  # a projector is not the model it belongs to
    assert runs_blob(["llama-server", f"--model=/m/blobs/{weights}"], weights)
    assert not runs_blob(["ollama", "serve"], weights) and not runs_blob(["x", "--model"], weights)


async def test_the_ollama_fake_is_strict(fakes: Fakes) -> None:
    ol = fakes.start("ollama", "--models", "qwen2.5:7b=1.0")
    r = await http("POST", ol.url + "/api/generate", json={"model": "qwen2.5:7b", "keepalive": 0})
    assert r.status_code == 400 and "keepalive" in r.json()["error"]
    r = await http("GET", ol.url + "/api/generate")
    assert r.status_code == 404 and r.text == "404 page not found"
    assert (await http("POST", ol.url + "/api/generate", json={"model": "nope"})).status_code == 404
    assert (await http("POST", ol.url + "/api/generate", json={})).json() == {"error": "model is required"}
    show = await http("POST", ol.url + "/api/show", json={"model": "qwen2.5:7b"})
    assert show.status_code == 200 and "\nFROM /fake/.ollama/models/blobs/sha256-" in show.json()["modelfile"]
    assert (
        await http("POST", ol.url + "/api/show", json={"model": "qwen2.5:7b", "verbos": True})
    ).status_code == 400
    assert (await http("POST", ol.url + "/api/show", json={"model": "nope"})).status_code == 404
    assert (await http("GET", ol.url + "/api/show")).status_code == 404
    await http("POST", ol.url + "/api/generate", json={"model": "qwen2.5:7b"})
    (ps,) = (await ol.get("/api/ps"))["models"]
    (runner,) = runner_pids(ol)
    argv = cmdline(runner)
    # As in Ollama: the runner loads the blob that /api/show names, not the digest /api/ps gives.
    assert argv[argv.index("--model") + 1].endswith(model_blob(show.json()["modelfile"]) or "?")
    assert not any(ps["digest"] in arg for arg in argv)


# -- llama.cpp router --------------------------------------------------------------------------


def llama_model(url: str, name: str, gb: float) -> dict[str, Any]:
    return {
        "kind": "llm",
        "vram_gb": gb,
        "backend": {"type": "llamacpp_router", "model": name, "url": url, "poll_s": 0.05},
    }


async def test_llamacpp_router_load_and_unload(device: SharedSimulatedDevice, fakes: Fakes) -> None:
    router = fakes.start(
        "llamacpp", "--models", "qwen-7b=5.0,llama-3b=3.0", "--load-s", "0.1", "--unload-s", "0.1"
    )
    orch = make_orch(
        device,
        {
            "qwen": llama_model(router.url, "qwen-7b", 5.5),
            "llama": llama_model(router.url, "llama-3b", 3.5),
            "sdxl-base": SDXL,
        },
        heavy_models=["sdxl"],
        light_models=["llm"],
    )
    async with orch:
        async with orch.acquire("qwen"), orch.acquire("llama"):
            status = {m["id"]: m["status"]["value"] for m in (await router.get("/models"))["data"]}
            assert status == {"qwen-7b": "loaded", "llama-3b": "loaded"}
            # Each model's bytes are its own child's (the router holds none itself).
            assert cooperative(orch, "qwen").measured_bytes() == 5 * GIB
            assert cooperative(orch, "llama").measured_bytes() == 3 * GIB
        await orch.unload("qwen", timeout=10)
        status = {m["id"]: m["status"]["value"] for m in (await router.get("/models"))["data"]}
        assert status == {"qwen-7b": "unloaded", "llama-3b": "loaded"}
        assert cooperative(orch, "qwen").measured_bytes(live_only=False) == 0
        assert cooperative(orch, "llama").measured_bytes() == 3 * GIB
        async with orch.acquire("sdxl-base"):  # 10.5 + 3 fits beside llama
            assert orch.ledger().get("llama") is not None
        assert device.peak_bytes <= BUDGET


async def test_llamacpp_router_that_cannot_load_says_why(device: SharedSimulatedDevice, fakes: Fakes) -> None:
    router = fakes.start("llamacpp", "--models", "huge=15.0")
    device.take_foreign(1, 2 * GIB)  # someone else's memory (pid 1 stands for another program)
    orch = make_orch(device, {"huge": llama_model(router.url, "huge", 13.0)})
    async with orch:
        with pytest.raises(Exception, match=r"child for huge exited with code 1 while loading"):
            async with orch.acquire("huge", timeout=10):
                pass
    device.release_foreign(1)


# -- SGLang ------------------------------------------------------------------------------------


async def test_sglang_release_and_resume(device: SharedSimulatedDevice, fakes: Fakes) -> None:
    sg = fakes.start("sglang", "--models", "qwen-14b=9.0", "--context-gb", "0.5", "--enable-memory-saver")
    spec = {
        "kind": "llm",
        "vram_gb": 9.5,
        "backend": {"type": "sglang", "url": sg.url, "idle_gb": 0.5, "poll_s": 0.05},
    }
    orch = make_orch(device, {"qwen": spec, "sdxl-base": SDXL})
    async with orch:
        async with orch.acquire("qwen"):
            assert cooperative(orch, "qwen").measured_bytes() == 9 * GIB
        async with orch.acquire("sdxl-base"):
            # Released, not stopped: the process keeps only its CUDA context.
            assert sg.proc.poll() is None and device.held_by_pid(sg.pid) == GIB // 2
        async with orch.acquire("qwen"):
            assert device.held_by_pid(sg.pid) == int(9.5 * GIB)
            r = await http(
                "POST",
                sg.url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.json()["choices"][0]["message"]["content"] == "echo: hi"
        assert device.peak_bytes <= BUDGET


async def test_an_sglang_started_without_memory_saver_is_stopped_to_evict_it(
    device: SharedSimulatedDevice, fakes: Fakes, tmp_path: Path
) -> None:
    cmd = [
        sys.executable,
        FAKES,
        "sglang",
        "--port",
        "{port}",
        "--device-socket",
        str(device.socket_path),
        "--models",
        "qwen-14b=9.0",
    ]
    spec = {
        "kind": "llm",
        "vram_gb": 9.5,
        "backend": {"type": "sglang", "command": cmd, "log_dir": str(tmp_path), "poll_s": 0.05},
    }
    orch = make_orch(device, {"qwen": spec, "sdxl-base": SDXL})
    async with orch:
        async with orch.acquire("qwen"):
            pid = cooperative(orch, "qwen").pid
            assert pid is not None and device.held_by_pid(pid) == 9 * GIB
            fakes.pids.add(pid)
            r = await http("PUT", cooperative(orch, "qwen").url + "/release_memory_occupation")
            assert r.status_code == 405 and r.json() == {"detail": "Method Not Allowed"}
        async with orch.acquire("sdxl-base"):
            assert not process_alive(pid) and device.held_by_pid(pid) == 0  # stopped: it could not release
        assert device.peak_bytes <= BUDGET
        async with orch.acquire("qwen"):  # started again
            assert cooperative(orch, "qwen").pid not in (None, pid)
        fakes.pids.add(cooperative(orch, "qwen").pid or 0)


# -- LM Studio ---------------------------------------------------------------------------------


async def test_lmstudio_unloads_its_instance_for_sdxl(device: SharedSimulatedDevice, fakes: Fakes) -> None:
    lm = fakes.start("lmstudio", "--models", "qwen/qwen3-4b-2507=4.0,google/gemma-3-12b=8.0")
    spec = {
        "kind": "llm",
        "vram_gb": 4.5,
        "backend": {"type": "lmstudio", "model": "qwen/qwen3-4b-2507", "url": lm.url, "poll_s": 0.05},
    }
    orch = make_orch(device, {"qwen": spec, "sdxl-base": SDXL})
    async with orch:
        async with orch.acquire("qwen"):
            entry = next(
                m for m in (await lm.get("/api/v1/models"))["models"] if m["key"] == "qwen/qwen3-4b-2507"
            )
            assert [i["id"] for i in entry["loaded_instances"]] == ["qwen/qwen3-4b-2507"]
            assert cooperative(orch, "qwen").measured_bytes() == 4 * GIB
        async with orch.acquire("sdxl-base"):
            models = (await lm.get("/api/v1/models"))["models"]
            assert all(m["loaded_instances"] == [] for m in models)
            assert runner_pids(lm) == set()
        assert device.peak_bytes <= BUDGET
    r = await http("POST", lm.url + "/api/v1/models/unload", json={"instance_id": "nope"})
    assert r.status_code == 404
    r = await http("POST", lm.url + "/api/v1/models/load", json={"model": "qwen/qwen3-4b-2507", "ttl": 5})
    assert r.status_code == 400 and "ttl" in r.json()["error"]["message"]


# -- ComfyUI -----------------------------------------------------------------------------------


async def wait_queue_empty(comfy: Fake, within: float = 5.0) -> None:
    with anyio.fail_after(within):
        while True:
            q = await comfy.get("/queue")
            if not q["queue_running"] and not q["queue_pending"]:
                return
            await anyio.sleep(0.01)


def comfy_prompt(ckpt: str) -> dict[str, Any]:
    return {"prompt": {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}}


async def test_comfyui_frees_its_models_then_reloads_them_by_its_next_prompt(
    device: SharedSimulatedDevice, fakes: Fakes
) -> None:
    comfy = fakes.start(
        "comfyui", "--models", "sdxl.safetensors=7.0", "--context-gb", "0.5", "--job-s", "0.05"
    )
    spec = {
        "kind": "sdxl",
        "vram_gb": 8.0,
        "backend": {"type": "comfyui", "url": comfy.url, "idle_gb": 0.5, "poll_s": 0.05},
    }
    qwen = {"kind": "llm", "vram_gb": 9.0}
    orch = make_orch(device, {"comfy": spec, "qwen": qwen})
    async with orch:
        async with orch.acquire("comfy"):
            r = await http("POST", comfy.url + "/prompt", json=comfy_prompt("sdxl.safetensors"))
            assert r.status_code == 200 and r.json()["node_errors"] == {}
            await wait_until(lambda: device.held_by_pid(comfy.pid) == int(7.5 * GIB), within=5)
            await wait_queue_empty(comfy)
        assert cooperative(orch, "comfy").measured_bytes() == 7 * GIB
        async with orch.acquire("qwen"):
            # /free was applied by ComfyUI's worker; only its CUDA context is left.
            assert device.held_by_pid(comfy.pid) == GIB // 2
            stats = (await comfy.get("/system_stats"))["devices"][0]
            assert stats["torch_vram_total"] == 0
        async with orch.acquire("comfy"):
            assert device.held_by_pid(comfy.pid) == GIB // 2  # nothing loads until a prompt
            await http("POST", comfy.url + "/prompt", json=comfy_prompt("sdxl.safetensors"))
            await wait_until(lambda: device.held_by_pid(comfy.pid) == int(7.5 * GIB), within=5)
        assert device.peak_bytes <= BUDGET
        r = await http("GET", comfy.url + "/free")
        assert r.status_code == 405
        assert (await http("POST", comfy.url + "/free", json={"unload_model": True})).status_code == 400


async def test_a_comfyui_that_keeps_its_models_fails_closed_naming_its_queue(
    device: SharedSimulatedDevice, fakes: Fakes
) -> None:
    comfy = fakes.start(
        "comfyui", "--models", "sdxl.safetensors=7.0", "--context-gb", "0.5", "--ignore-release"
    )
    spec = {
        "kind": "sdxl",
        "vram_gb": 8.0,
        "backend": {"type": "comfyui", "url": comfy.url, "idle_gb": 0.5, "poll_s": 0.05},
    }
    orch = make_orch(device, {"comfy": spec, "qwen": {"kind": "llm", "vram_gb": 9.0}})
    async with orch:
        async with orch.acquire("comfy"):
            await http("POST", comfy.url + "/prompt", json=comfy_prompt("sdxl.safetensors"))
            await wait_until(lambda: device.held_by_pid(comfy.pid) == int(7.5 * GIB), within=5)
            await wait_queue_empty(comfy)
        with pytest.raises(VRAMNotReleased) as ei:
            async with orch.acquire("qwen", timeout=15):
                pytest.fail("qwen was loaded although ComfyUI kept its models")
        msg = str(ei.value)
        assert f"comfyui at {comfy.url} (pid {comfy.pid})" in msg and "7.00 GiB" in msg
        assert "POST /free" in msg
        assert device.held_by("qwen") == 0 and device.peak_bytes <= BUDGET


async def test_the_llamacpp_and_comfyui_fakes_answer_as_the_programs_do(fakes: Fakes) -> None:
    router = fakes.start("llamacpp", "--models", "qwen-7b=1.0")
    r = await http("POST", router.url + "/models/unload", json={"model": "qwen-7b"})
    assert r.status_code == 400
    assert r.json() == {
        "error": {"code": 400, "message": "model is not running", "type": "invalid_request_error"}
    }
    r = await http("POST", router.url + "/models/load", json={"model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["message"] == "model is not found"
    assert (
        await http("POST", router.url + "/models/load", json={"model": "qwen-7b", "x": 1})
    ).status_code == 400
    assert (await http("GET", router.url + "/models/load")).status_code == 404
    comfy = fakes.start("comfyui", "--models", "sdxl.safetensors=1.0")
    r = await http("POST", comfy.url + "/prompt", json={"prompt": {}})
    assert r.status_code == 400 and r.json()["error"]["type"] == "no_prompt"
    r = await http("POST", comfy.url + "/prompt", json=comfy_prompt("other.safetensors"))
    assert r.status_code == 400 and r.json()["node_errors"]
    assert (await http("POST", comfy.url + "/free", json={})).text == ""


# -- demand from programs that never call the orchestrator ---------------------------------------


async def test_comfyui_queue_takes_the_card_from_an_idle_llm_and_gives_it_back(
    device: SharedSimulatedDevice, fakes: Fakes
) -> None:
    ol = fakes.start("ollama", "--models", "qwen2.5:7b=9.0")
    # Its checkpoint takes a second to read from disk before it reaches the GPU; each prompt
    # then runs half a second.
    comfy = fakes.start(
        "comfyui",
        "--models",
        "sdxl.safetensors=7.0",
        "--context-gb",
        "0.5",
        "--load-s",
        "1.0",
        "--job-s",
        "0.5",
    )
    comfy_spec = {
        "kind": "sdxl",
        "vram_gb": 7.5,
        "backend": {"type": "comfyui", "url": comfy.url, "idle_gb": 0.5, "poll_s": 0.05},
    }
    orch = make_orch(device, {"qwen": ollama_model(ol.url), "comfy": comfy_spec})
    async with orch:
        async with orch.acquire("qwen"):
            (runner,) = runner_pids(ol)
        # A prompt sent to ComfyUI directly, as its web UI does: the orchestrator never hears of it.
        r = await http("POST", comfy.url + "/prompt", json=comfy_prompt("sdxl.safetensors"))
        prompt_id = r.json()["prompt_id"]
        await wait_until(
            lambda: orch.leases().get("comfy") == 1, within=5, what="a lease on ComfyUI's behalf"
        )
        # The idle LLM was asked to leave through Ollama's own API before ComfyUI's model came in.
        assert (await ol.get("/api/ps"))["models"] == [] and not process_alive(runner)
        await wait_queue_empty(comfy)
        history = await comfy.get("/history")
        assert history[prompt_id]["status"]["status_str"] == "success"
        # The queue is empty: the lease on its behalf ends, and the card is there for others.
        await wait_until(lambda: not orch.leases().get("comfy"), within=5, what="the lease ended")
        async with orch.acquire("qwen", timeout=10):
            assert device.held_by_pid(comfy.pid) == GIB // 2  # /free took ComfyUI's models back
        assert device.peak_bytes <= BUDGET


async def test_a_comfyui_prompt_that_starts_before_its_lease_is_granted(
    device: SharedSimulatedDevice, fakes: Fakes
) -> None:
    """ComfyUI's API cannot hold its queue (``orchestrator/backends/comfyui.py``): a prompt
    sent to an idle ComfyUI starts at once, before the orchestrator has seen it (``poll_s``) and
    taken the card from the idle LLM. ComfyUI moves to the GPU what the free memory allows; the
    orchestrator counts that as another program's memory (its ledger stays within the budget
    and nothing of its own is loaded into it), gives the idle LLM back through Ollama's API,
    and holds ComfyUI's slot on its behalf. (A prompt queued under a lease loads in full:
    ``test_comfyui_frees_its_models_then_reloads_them_by_its_next_prompt``.)"""
    ol = fakes.start("ollama", "--models", "qwen2.5:7b=9.0")
    # Its prompt runs 3 s; the orchestrator looks at ComfyUI's queue every second.
    comfy = fakes.start(
        "comfyui", "--models", "sdxl.safetensors=7.0", "--context-gb", "0.5", "--job-s", "3.0"
    )
    comfy_spec = {
        "kind": "sdxl",
        "vram_gb": 7.5,
        "backend": {"type": "comfyui", "url": comfy.url, "idle_gb": 0.5, "poll_s": 1.0},
    }
    orch = make_orch(device, {"qwen": ollama_model(ol.url), "comfy": comfy_spec})
    seen: list[tuple[Any, Any]] = []
    orch.add_listener(lambda e: seen.append((e, orch.ledger())))
    async with orch:
        async with orch.acquire("qwen"):
            pass
        r = await http("POST", comfy.url + "/prompt", json=comfy_prompt("sdxl.safetensors"))
        prompt_id = r.json()["prompt_id"]
        await wait_until(
            lambda: orch.leases().get("comfy") == 1, within=10, what="a lease on ComfyUI's behalf"
        )
        await wait_queue_empty(comfy)
        assert (await comfy.get("/history"))[prompt_id]["status"]["status_str"] == "success"
    # The prompt ran before the lease: with the 6.5 GiB the card had free beside Qwen's 9 GiB.
    assert f"loaded partially: {int(6.5 * GIB)} of {7 * GIB} bytes" in comfy.log.read_text()
    assert device.peak_bytes == 16 * GIB > BUDGET  # ComfyUI's own doing: the window that stays open
    # The orchestrator's account: ComfyUI's memory was another program's until the grant, and
    # Qwen left through Ollama's API, for ComfyUI's lease or at once when the orchestrator saw
    # the card over the room (whichever came first); the ledger never held both, nor more than
    # the budget.
    evict = next(e for e, _ in seen if e.kind == "evict" and e.model == "qwen")
    assert evict.detail in ("gpu -> disk for comfy", "gpu -> disk (over the room)")
    assert next(ledger for e, ledger in seen if e is evict).foreign_bytes >= 7 * GIB
    assert all(e.committed_bytes <= e.budget_bytes for e, _ in seen)
    assert not any({"qwen", "comfy"} <= {r.model for r in ledger.gpu_residents} for _, ledger in seen)


async def test_a_model_loaded_by_hand_in_ollama_while_sdxl_is_resident_is_adopted_in_place(
    device: SharedSimulatedDevice, fakes: Fakes
) -> None:
    ol = fakes.start("ollama", "--models", "llama3.2:3b=3.0")
    small = ollama_model(ol.url, model="llama3.2:3b")
    small["vram_gb"] = 3.5
    orch = make_orch(device, {"small": small, "sdxl-base": SDXL}, heavy_models=["sdxl"], light_models=["llm"])
    events: list[Any] = []
    orch.add_listener(events.append)
    async with orch:
        async with orch.acquire("sdxl-base"):
            pass
        # `ollama run llama3.2:3b` in a terminal: Ollama loads it for 5 minutes, on its own.
        await http("POST", ol.url + "/api/generate", json={"model": "llama3.2:3b"})
        (runner,) = runner_pids(ol)

        def resident() -> bool:
            r = orch.ledger().get("small")
            return r is not None and r.tier is Tier.GPU and not orch.leases().get("small")

        await wait_until(resident, within=10, what="the hand-loaded model is resident in the ledger")
        # Adopted where it is: the same runner, nothing unloaded or loaded again; counted as the
        # model it is (measured by its runner, at its estimate in the ledger), not as someone
        # else's memory; SDXL stayed, and the budget held.
        assert [e.kind for e in events if e.model == "small" and e.kind in ("adopt", "load", "evict")] == [
            "adopt"
        ]
        assert runner_pids(ol) == {runner} and cooperative(orch, "small").measured_bytes() == 3 * GIB
        assert orch.ledger().get("small").vram_bytes == int(3.5 * GIB)  # type: ignore[union-attr]
        assert orch.ledger().get("sdxl-base") is not None and orch.ledger().foreign_bytes == 0
        assert orch.statistics().loads == 1  # SDXL's
        ps = (await ol.get("/api/ps"))["models"]
        assert [m["name"] for m in ps] == ["llama3.2:3b"]
        assert not ps[0]["expires_at"].startswith("2318")  # Ollama's own keep-alive, untouched
        assert device.peak_bytes <= BUDGET
        # From now on it is a resident like any other: a lease on it uses that very runner.
        async with orch.acquire("small") as lease:
            r = await lease.handle.client.post(
                "/v1/chat/completions",
                json={"model": "llama3.2:3b", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.json()["choices"][0]["message"]["content"] == "echo: hi"
        assert runner_pids(ol) == {runner}


async def test_a_model_ollama_holds_when_the_orchestrator_attaches_is_adopted(
    device: SharedSimulatedDevice, fakes: Fakes
) -> None:
    ol = fakes.start("ollama", "--models", "qwen2.5:7b=9.0")
    # Loaded before the orchestrator starts (by a client, or an earlier run), kept forever.
    await http("POST", ol.url + "/api/generate", json={"model": "qwen2.5:7b", "keep_alive": -1})
    (runner,) = runner_pids(ol)
    orch = make_orch(device, {"qwen": ollama_model(ol.url), "sdxl-base": SDXL})
    events: list[Any] = []
    orch.add_listener(events.append)
    async with orch:
        b = cooperative(orch, "qwen")
        await wait_until(lambda: b.tier is Tier.GPU, within=5, what="the orchestrator saw Ollama's model")
        async with orch.acquire("qwen", timeout=10) as lease:
            assert lease.handle.base_url == ol.url and b.is_alive()
            assert runner_pids(ol) == {runner}  # the very runner: no reload
            r = orch.ledger().get("qwen")
            assert r is not None and r.vram_bytes == int(9.5 * GIB)
        adopt = [e for e in events if e.model == "qwen" and e.kind == "adopt"]
        assert len(adopt) == 1 and adopt[0].bytes_after == 9 * GIB and "not loaded" in (adopt[0].detail or "")
        assert not [e for e in events if e.model == "qwen" and e.kind == "load"]
        settle = [e for e in events if e.kind == "transition" and e.trigger == "settle"]
        assert settle and settle[0].to_state == "LLM_ACTIVE" and orch.state.name == "LLM_ACTIVE"
        # It leaves as any resident does: through Ollama's own unload, verified on the device.
        async with orch.acquire("sdxl-base"):
            assert not process_alive(runner) and device.held_by_pid(runner) == 0
            assert (await ol.get("/api/ps"))["models"] == []
        assert device.peak_bytes <= BUDGET


async def test_a_model_loaded_by_hand_that_does_not_fit_is_given_back(
    device: SharedSimulatedDevice, fakes: Fakes
) -> None:
    """Loaded by hand past what the budget allows (beside SDXL, 10.5 + 5.5 GiB over 15.5): it is
    not adopted; Ollama is asked to unload it, and SDXL, in use, keeps the card."""
    ol = fakes.start("ollama", "--models", "llama3.2:3b=5.5")
    small = ollama_model(ol.url, model="llama3.2:3b")
    small["vram_gb"] = 5.5
    orch = make_orch(device, {"small": small, "sdxl-base": SDXL}, heavy_models=["sdxl"], light_models=["llm"])
    events: list[Any] = []
    orch.add_listener(events.append)
    both: list[Any] = []
    orch.add_listener(
        lambda e: (
            both.append(e)
            if {"small", "sdxl-base"} <= {r.model for r in orch.ledger().gpu_residents}
            else None
        )
    )
    async with orch:
        async with orch.acquire("sdxl-base"):
            await http("POST", ol.url + "/api/generate", json={"model": "llama3.2:3b"})
            (runner,) = runner_pids(ol)

            def evicted() -> list[Any]:
                return [e for e in events if e.model == "small" and e.kind == "evict"]

            await wait_until(lambda: bool(evicted()), within=10, what="the hand-loaded copy given back")
            assert "left over" in (evicted()[0].detail or "")
            # Through Ollama's own unload, verified on the device; SDXL, in use, kept the card.
            assert not process_alive(runner) and device.held_by_pid(runner) == 0
            assert orch.ledger().get("sdxl-base") is not None
        assert not [e for e in events if e.kind == "adopt"]
        assert not both  # the ledger never held the two together


async def test_the_gateway_in_front_of_ollama_with_the_openai_client(
    device: SharedSimulatedDevice, fakes: Fakes
) -> None:
    """An ``openai`` client pointed at the daemon's gateway instead of at Ollama gets the same
    answer, with the model leased for the request and the card shared: the next SDXL request
    takes it from Ollama through Ollama's own API."""
    openai = pytest.importorskip("openai")
    from orchestrator.daemon import Daemon, LeaseManager, create_app

    ol = fakes.start("ollama", "--models", "qwen2.5:7b=9.0")
    config = make_config({"qwen": ollama_model(ol.url), "sdxl-base": SDXL})
    async with Orchestrator(config, device=device) as orch:
        async with LeaseManager(orch, config.daemon) as leases:
            d = Daemon(orch, leases, config.daemon, None)
            app = create_app(d)
            http_client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://daemon")
            client = openai.AsyncOpenAI(
                base_url="http://daemon/v1", api_key="unused", max_retries=0, http_client=http_client
            )
            reply = await client.chat.completions.create(
                model="qwen", messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content == "echo: hi"  # Ollama's own answer
            assert orch.ledger().on_gpu("qwen") and not orch.leases()  # leased for the request only
            async with orch.acquire("sdxl-base"):
                assert (await ol.get("/api/ps"))["models"] == []  # released through Ollama's API
            await client.close()
            await d.upstreams.aclose()  # the gateway's connections to Ollama (serve() closes them too)
