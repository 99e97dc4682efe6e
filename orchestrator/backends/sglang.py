"""An SGLang server as a model: its memory released and resumed without a restart.

SGLang (``python/sglang/srt/entrypoints/http_server.py``) loads its model when it starts.
Started with ``--enable-memory-saver``, it gives the GPU memory of its weights and KV cache
back on ``POST /release_memory_occupation`` and takes it again on
``POST /resume_memory_occupation`` (both answer 200 once the scheduler has done it, or 400
``{"error": {"message"}}``), so an evicted SGLang model comes back in seconds, not the
minutes of a cold start; its processes keep their CUDA context meanwhile (``idle_gb``). The
server has no call that says whether its memory is released: the orchestrator keeps that
itself, and the device (by pid) says whether the memory really went.

Config::

    backend:
      type: sglang
      url: http://127.0.0.1:30000       # attach; or, to start it:
      # model: /models/qwen2.5-7b        # (started: --model-path) and served_model
      # command: [python, -m, sglang.launch_server, --model-path, "{model}",
      #           --host, "{host}", --port, "{port}", --enable-memory-saver]   (the default)
      idle_gb: 1.0

A server that refuses to release (started without ``--enable-memory-saver``) is stopped
instead when the orchestrator started it; an attached one fails the eviction with the fix.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import httpx

from orchestrator.backends.base import BackendType
from orchestrator.backends.cooperative import CooperativeBackend, error_text
from orchestrator.backends.cooperative_options import CooperativeOptions, parse_cooperative
from orchestrator.backends.options import options_of
from orchestrator.errors import LoadFailed, UnloadFailed
from orchestrator.spec import Config, ModelSpec

if TYPE_CHECKING:
    from orchestrator.device.base import Device

logger = logging.getLogger("orchestrator.sglang")


def parse(opts: Mapping[str, Any]) -> CooperativeOptions:
    default = None
    if "url" not in opts:
        default = (sys.executable, "-m", "sglang.launch_server", "--model-path", "{model}",
                   "--host", "{host}", "--port", "{port}", "--enable-memory-saver")  # fmt: skip
    return parse_cooperative(
        opts,
        program="sglang",
        health_path="/health",
        default_command=default,
        model_example="/models/qwen2.5-7b",
        model_required="url" not in opts and "command" not in opts,  # the default command needs it
    )


class SGLangBackend(CooperativeBackend):
    VIEW: ClassVar[str] = "its own record (SGLang cannot say)"
    RELEASE: ClassVar[str] = "POST /release_memory_occupation"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._released_by: int | None = None  # the server process whose memory was released
        self._saver: bool | None = None  # started with --enable-memory-saver (None: unknown)
        self._saver_of: int | None = None  # the server process that answered that

    @property
    def released(self) -> bool:
        """This server's memory was released and not resumed since (a server that started
        again holds its model again)."""
        return self._released_by is not None and self._released_by == self._root

    async def read_view(self, client: httpx.AsyncClient) -> dict[str, Any]:
        r = await client.get("/health")
        r.raise_for_status()
        if self._saver_of != self._root:
            # /get_server_info lists the server's arguments, enable_memory_saver among them
            info = await client.get("/get_server_info")
            self._saver = bool(info.json().get("enable_memory_saver")) if info.status_code == 200 else None
            self._saver_of = self._root
            if self._saver is False and self.attached:
                logger.warning(
                    "%s: sglang at %s was started without --enable-memory-saver: it cannot give its "
                    "memory back, so the orchestrator counts it as another program's",
                    self.name, self.url,
                )  # fmt: skip
        return {"released": self.released, "memory_saver": self._saver}

    async def request_load(self, client: httpx.AsyncClient, limit_bytes: int | None) -> None:
        if not self.released:
            return  # the server loaded its model when it started
        r = await client.post("/resume_memory_occupation", json={}, timeout=None)
        if r.status_code != 200:
            why = f"sglang's POST /resume_memory_occupation answered {r.status_code}: {error_text(r)}"
            raise LoadFailed(self.name, why)
        self._released_by = None

    async def request_release(self, client: httpx.AsyncClient) -> None:
        if self.released:
            return
        r = await client.post("/release_memory_occupation", json={})
        if r.status_code != 200:
            why = f"sglang's POST /release_memory_occupation answered {r.status_code}: {error_text(r)}"
            if self.attached:
                raise UnloadFailed(self.name, f"{why}; start SGLang with --enable-memory-saver")
            with anyio.CancelScope(shield=True):
                await self._server.unload()  # the server we started: stopping it frees all
            return
        self._released_by = self._root

    def holds_outside(self) -> bool:
        # A server holds its model from its start; one that cannot release it is foreign memory.
        return self._saver is True and not self.released and bool(self.measured_bytes())

    def release_hint(self, view: Any) -> str:
        return "the server answered the release but its processes kept the memory"


def create(spec: ModelSpec, *, config: Config, device: Device, log_dir: Path) -> SGLangBackend:
    return SGLangBackend(
        spec, config=config, device=device, log_dir=log_dir, options=options_of(spec, CooperativeOptions)
    )


BACKEND = BackendType(parse=parse, create=create)
