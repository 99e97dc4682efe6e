"""An LM Studio model: loaded and unloaded through LM Studio's REST API.

LM Studio's REST API (v1, LM Studio 0.4; lmstudio.ai/docs/developer/rest): ``GET
/api/v1/models`` lists every model on disk (``key``, ``size_bytes``, ...) with its
``loaded_instances`` (each an ``id`` and its ``config``); ``POST /api/v1/models/load``
``{"model": key}`` loads one and answers ``{"type", "instance_id", "load_time_seconds",
"status": "loaded"}``; ``POST /api/v1/models/unload`` ``{"instance_id"}`` unloads one instance.
A token, when the server requires one, goes in ``Authorization: Bearer`` (``api_token``).

LM Studio runs its models in worker processes below its own; it does not say which worker
holds which model, so a model's bytes are the program's minus what its other loaded models
take on disk (``size_bytes``): exact with one model loaded, an approximation with several.

Config::

    backend:
      type: lmstudio
      model: qwen/qwen3-4b-2507            # its key in GET /api/v1/models
      url: http://127.0.0.1:1234           # LM Studio's server (`lms server start`)
      # api_token: ...                     # when the server requires one
      # command: [lms, server, start, --port, "{port}"]   (to start it)

Turn off LM Studio's own idle auto-eviction (JIT "auto-evict" and idle TTL) for the models
the orchestrator manages: the orchestrator decides what leaves the card.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import httpx

from orchestrator.backends.base import BackendType
from orchestrator.backends.cooperative import CooperativeBackend, check_status
from orchestrator.backends.cooperative_options import CooperativeOptions, parse_cooperative
from orchestrator.backends.options import OptionError, options_of
from orchestrator.errors import LoadFailed, UnloadFailed
from orchestrator.spec import Config, ModelSpec

if TYPE_CHECKING:
    from orchestrator.device.base import Device


def parse(opts: Mapping[str, Any]) -> CooperativeOptions:
    token = opts.get("api_token")
    if token is not None and (not isinstance(token, str) or not token):
        raise OptionError("api_token", f"expected the server's API token, got {token!r}")
    return parse_cooperative(
        opts,
        program="lmstudio",
        health_path="/api/v1/models",
        default_command=None,
        extra_keys=("api_token",),
        model_example="qwen/qwen3-4b-2507",
    )


class LMStudioBackend(CooperativeBackend):
    VIEW: ClassVar[str] = "GET /api/v1/models"
    RELEASE: ClassVar[str] = "POST /api/v1/models/unload"

    def _client(self, timeout: float = 30.0) -> httpx.AsyncClient:
        token = self.options.extra.get("api_token")
        headers = {"Authorization": f"Bearer {token}"} if token else None
        assert self.url is not None
        return httpx.AsyncClient(base_url=self.url, timeout=timeout, headers=headers)

    def _entry(self, view: Any) -> dict[str, Any] | None:
        return next((dict(m) for m in view or () if m.get("key") == self.model), None)

    def _instances(self, view: Any) -> list[str]:
        entry = self._entry(view)
        return [str(i["id"]) for i in (entry or {}).get("loaded_instances") or ()]

    async def read_view(self, client: httpx.AsyncClient) -> list[dict[str, Any]]:
        r = await client.get("/api/v1/models")
        r.raise_for_status()
        models: list[dict[str, Any]] = r.json().get("models") or []
        return models

    def view_holds(self, view: Any) -> bool | None:
        return None if view is None else bool(self._instances(view))

    def view_failed(self, view: Any) -> str | None:
        if view is not None and self._entry(view) is None:
            return f"LM Studio at {self.url} has no model {self.model!r} (GET /api/v1/models)"
        return None

    def others_bytes(self) -> int:
        return sum(
            int(m.get("size_bytes") or 0)
            for m in self.view or ()
            if m.get("key") != self.model and m.get("loaded_instances")
        )

    async def request_load(self, client: httpx.AsyncClient, limit_bytes: int | None) -> None:
        r = await client.post("/api/v1/models/load", json={"model": self.model}, timeout=None)
        check_status(r, "LM Studio's POST /api/v1/models/load", self.name, LoadFailed)

    async def request_release(self, client: httpx.AsyncClient) -> None:
        for instance in self._instances(self.view):
            r = await client.post("/api/v1/models/unload", json={"instance_id": instance})
            check_status(r, "LM Studio's POST /api/v1/models/unload", self.name, UnloadFailed)

    def release_hint(self, view: Any) -> str:
        if self.view_holds(view):
            return f"GET /api/v1/models still lists instances {self._instances(view)}"
        return "its worker processes still hold the memory although no instance is listed"


def create(spec: ModelSpec, *, config: Config, device: Device, log_dir: Path) -> LMStudioBackend:
    return LMStudioBackend(
        spec, config=config, device=device, log_dir=log_dir, options=options_of(spec, CooperativeOptions)
    )


BACKEND = BackendType(parse=parse, create=create)
