"""A model of llama.cpp's ``llama-server`` in router mode: loaded and released through the
router's model API.

The router (``tools/server/server-models.cpp``, ``tools/server/README.md``; started without
``--model``, with ``--models-dir`` or ``--models-preset``) runs one child ``llama-server``
per loaded model, with ``--alias <model>`` among its arguments (how its bytes on the device
are told apart from the other models'). ``GET /models`` lists every model with its
``status.value`` (``unloaded``, ``loading``, ``loaded``, ``sleeping``; a failed load is
``unloaded`` with ``failed: true`` and the child's ``exit_code``); ``POST /models/load`` and
``POST /models/unload`` with ``{"model": name}`` answer ``{"success": true}`` at once, before
the child is ready or gone, which is what the orchestrator then waits for.

Config::

    backend:
      type: llamacpp_router
      model: qwen2.5-7b-instruct-q4_k_m     # its name in GET /models
      url: http://127.0.0.1:8080            # attach; or, to start the router:
      # models_dir: ~/models                # the default command is
      #   llama-server --host {host} --port {port} --models-dir DIR
      #                --models-max 0 --no-models-autoload
      # args: []                            # more router arguments

A started router gets ``--models-max 0`` (its own least-recently-used eviction is off: the
orchestrator decides what leaves) and ``--no-models-autoload`` (a request for a model that is
not loaded is refused instead of loading it behind the orchestrator's back).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import httpx

from orchestrator.backends.base import BackendType
from orchestrator.backends.cooperative import CooperativeBackend, check_status, error_text
from orchestrator.backends.cooperative_options import CooperativeOptions, parse_cooperative
from orchestrator.backends.options import OptionError, options_of, path_option
from orchestrator.backends.procs import cmdline
from orchestrator.errors import LoadFailed, UnloadFailed
from orchestrator.spec import Config, ModelSpec

if TYPE_CHECKING:
    from orchestrator.device.base import Device

ROUTER_ARGS = ("--models-max", "0", "--no-models-autoload")


def parse(opts: Mapping[str, Any]) -> CooperativeOptions:
    mine = {k: opts[k] for k in ("models_dir", "args") if k in opts}
    rest = {k: v for k, v in opts.items() if k not in mine}
    args = mine.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise OptionError("args", f"expected a list of strings, got {args!r}")
    default: tuple[str, ...] | None = None
    if "url" not in rest and "command" not in rest:
        models_dir = path_option(mine, "models_dir", required=False)
        if models_dir is None:
            raise OptionError(
                "models_dir", "missing: give the folder of GGUF models the router serves, or url to attach"
            )
        default = ("llama-server", "--host", "{host}", "--port", "{port}", "--models-dir", str(models_dir),
                   *ROUTER_ARGS, *args)  # fmt: skip
    elif mine:
        raise OptionError(
            next(iter(mine)), "only for a router the orchestrator starts without a command of its own"
        )
    return parse_cooperative(
        rest,
        program="llama-server",
        health_path="/health",
        default_command=default,
        model_example="qwen2.5-7b-instruct-q4_k_m",
    )


class LlamaRouterBackend(CooperativeBackend):
    VIEW: ClassVar[str] = "GET /models"
    RELEASE: ClassVar[str] = "POST /models/unload"

    def _entry(self, view: Any) -> dict[str, Any] | None:
        for m in view or ():
            if m.get("id") == self.model or self.model in (m.get("aliases") or ()):
                return dict(m)
        return None

    def _status(self, view: Any) -> str | None:
        entry = self._entry(view)
        return None if entry is None else str((entry.get("status") or {}).get("value"))

    async def read_view(self, client: httpx.AsyncClient) -> list[dict[str, Any]]:
        r = await client.get("/models")
        r.raise_for_status()
        data: list[dict[str, Any]] = r.json().get("data") or []
        return data

    def view_holds(self, view: Any) -> bool | None:
        if view is None:
            return None
        return self._status(view) in ("loaded", "sleeping")  # ("loading": not yet)

    def view_failed(self, view: Any) -> str | None:
        entry = self._entry(view)
        if entry is None:
            return f"llama-server at {self.url} does not know a model {self.model!r} (GET /models)"
        status = entry.get("status") or {}
        if status.get("value") == "unloaded" and status.get("failed"):
            code = status.get("exit_code")
            return f"llama-server's child for {self.model} exited with code {code} while loading"
        return None

    def model_pids(self, pids: set[int]) -> set[int] | None:
        out = set()
        for p in pids:
            args = cmdline(p)
            if any(a == "--alias" and i + 1 < len(args) and self.model in args[i + 1].split(",")
                   for i, a in enumerate(args)):  # fmt: skip
                out.add(p)
        return out

    async def request_load(self, client: httpx.AsyncClient, limit_bytes: int | None) -> None:
        r = await client.post("/models/load", json={"model": self.model})
        if r.status_code == 400 and "already running" in error_text(r):
            return  # loading or loaded already (by a request, or by hand)
        check_status(r, "llama-server's POST /models/load", self.name, LoadFailed)

    async def request_release(self, client: httpx.AsyncClient) -> None:
        r = await client.post("/models/unload", json={"model": self.model})
        if r.status_code == 400 and "not running" in error_text(r):
            return  # gone already
        check_status(r, "llama-server's POST /models/unload", self.name, UnloadFailed)

    def release_hint(self, view: Any) -> str:
        status = self._status(view)
        if status in ("loaded", "loading", "sleeping"):
            return f"GET /models still says {status!r}"
        return "its child process still holds the memory although GET /models says it is unloaded"


def create(spec: ModelSpec, *, config: Config, device: Device, log_dir: Path) -> LlamaRouterBackend:
    return LlamaRouterBackend(
        spec, config=config, device=device, log_dir=log_dir, options=options_of(spec, CooperativeOptions)
    )


BACKEND = BackendType(parse=parse, create=create)
