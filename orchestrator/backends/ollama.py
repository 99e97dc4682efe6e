"""An Ollama model: loaded, released and watched through Ollama's own API.

Ollama (``server/routes.go``, ``api/types.go``): ``GET /api/ps`` lists the loaded models with
``size_vram`` and ``expires_at``; ``POST /api/generate`` with a model and no prompt loads it
(``keep_alive: -1`` keeps it loaded until told otherwise) or, with ``keep_alive: 0``, unloads
it (the answer, ``done_reason: "unload"``, comes at once; the model's runner process exits
afterwards, which is what the release wait waits for). Each loaded model runs in a runner
process of its own, a child of ``ollama serve``, started with the model's weights on its
command line (``llm/server.go``: ``ollama runner --model <models>/blobs/sha256-<hex> --port N``
up to v0.29; ``llm/llama_server.go``: ``llama-server --model <models>/blobs/sha256-<hex> ...``
from v0.30): that is how its bytes on the device are told apart from the other models'. The
``digest`` that ``/api/ps`` gives is the model's *manifest* digest (``server/images.go``
``GetModel``), not that blob's, so the blob is read once per manifest from ``POST /api/show``:
the first ``FROM`` of the Modelfile it returns is the weights' path (``Model.String()``).

Config::

    backend:
      type: ollama
      model: qwen2.5:7b               # as in `ollama ps` (":latest" is added when no tag)
      url: http://127.0.0.1:11434     # attach to the running Ollama; or, to start one:
      # command: [ollama, serve]      # (the default) with OLLAMA_HOST={host}:{port} and
      #                                 OLLAMA_KEEP_ALIVE=-1: it never unloads on its own timer

An attached Ollama keeps its own settings: a model used directly (not through the
orchestrator) with the default ``keep_alive`` is unloaded by Ollama 5 minutes later, which
the orchestrator sees at once (the model leaves the ledger). A model Ollama holds that the
orchestrator did not load (a client of Ollama's own loaded it, or it was loaded when the
orchestrator attached) is adopted in place when the ledger with it fits the budget and the
exclusive kinds: resident from then on, at what its runner holds (or its estimate, when
larger), with no reload, and with Ollama's own ``expires_at`` left as it is (asking Ollama to
keep it longer would be a request that reloads it when the client's options differ,
``server/sched.go`` ``needsReload``). When it does not fit, it is given back through
``keep_alive: 0``, and a client's load (a finite ``expires_at``) is then demand: a lease is
held on its behalf and the model loaded within the budget, as any waiter's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, ClassVar

import httpx

from orchestrator.backends.base import BackendType
from orchestrator.backends.cooperative import CooperativeBackend, check_status, error_text
from orchestrator.backends.cooperative_options import CooperativeOptions, parse_cooperative
from orchestrator.backends.options import options_of
from orchestrator.backends.procs import cmdline
from orchestrator.errors import LoadFailed, UnloadFailed
from orchestrator.spec import Config, ModelSpec
from states.ledger import Tier

if TYPE_CHECKING:
    from orchestrator.device.base import Device

logger = logging.getLogger("orchestrator.cooperative")

# ``keep_alive: -1`` shows in /api/ps as an expiry centuries away (Go's maximum duration, about
# 292 years, from now); any client's finite keep_alive is an expiry within years.
FOREVER_AFTER_YEARS = 100


def kept_forever(expires_at: str) -> bool:
    """An ``expires_at`` of ``keep_alive: -1`` (the orchestrator's own loads)."""
    try:
        return int(expires_at[:4]) > time.gmtime().tm_year + FOREVER_AFTER_YEARS
    except ValueError:
        return False


RESERVED_ENV = {"OLLAMA_HOST": "{host}:{port}", "OLLAMA_KEEP_ALIVE": "-1"}


def parse(opts: Mapping[str, Any]) -> CooperativeOptions:
    return parse_cooperative(
        opts,
        program="ollama",
        health_path="/api/version",
        default_command=("ollama", "serve"),
        reserved_env=RESERVED_ENV,
        model_example="qwen2.5:7b",
    )


def full_name(model: str) -> str:
    """Ollama's display name: a model without a tag is ``:latest``."""
    return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"


def model_blob(modelfile: str) -> str | None:
    """The weights' blob file (``sha256-<hex>``) in the Modelfile ``/api/show`` returns: its
    first ``FROM`` (later ones are projectors); None when it names no blob (a model Ollama runs
    from elsewhere)."""
    for line in modelfile.splitlines():
        if line.startswith("FROM "):
            name = PurePath(line[5:].strip().strip('"')).name
            return name if name.startswith("sha256-") else None
    return None


def runs_blob(argv: list[str], blob: str) -> bool:
    """A runner's command line loads ``blob`` (``--model PATH``, ``--model=PATH`` or ``-m PATH``)."""
    for i, arg in enumerate(argv):
        if arg in ("--model", "-m") and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--model="):
            path = arg.removeprefix("--model=")
        else:
            continue
        if PurePath(path).name == blob:
            return True
    return False


class OllamaBackend(CooperativeBackend):
    VIEW: ClassVar[str] = "/api/ps"
    RELEASE: ClassVar[str] = 'POST /api/generate {"keep_alive": 0}'

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tagged = full_name(self.model)
        self.digest: str | None = None  # its manifest's digest, once /api/ps has shown it
        self.blob: str | None = None  # its weights' blob file (sha256-<hex>), from /api/show
        self._shown: str | None = None  # the manifest digest ``blob`` was read for

    def _mine(self, m: Mapping[str, Any]) -> bool:
        return self.tagged in (full_name(str(m.get("name", ""))), full_name(str(m.get("model", ""))))

    async def read_view(self, client: httpx.AsyncClient) -> list[dict[str, Any]]:
        r = await client.get("/api/ps")
        r.raise_for_status()
        models: list[dict[str, Any]] = r.json().get("models") or []
        for m in models:
            if self._mine(m) and m.get("digest"):
                self.digest = str(m["digest"])
        if self.digest is not None and self._shown != self.digest:
            await self._read_blob(client)
        return models

    async def _read_blob(self, client: httpx.AsyncClient) -> None:
        """Which blob the model runs from: the first ``FROM`` of ``POST /api/show``'s
        Modelfile (read again only when the manifest changes: a new ``ollama pull``)."""
        r = await client.post("/api/show", json={"model": self.model})
        self._shown = self.digest
        try:
            shown = r.json() if r.status_code == 200 else {}
        except ValueError:
            shown = {}
        self.blob = model_blob(str(shown.get("modelfile") or "")) if isinstance(shown, dict) else None
        if self.blob is None:
            logger.warning(
                "%s: ollama's POST /api/show does not say which blob %s runs from (%s): its runner's "
                "memory cannot be told apart and counts as another program's",
                self.name,
                self.model,
                error_text(r) if r.status_code != 200 else "no FROM <blob path>",
            )

    def view_holds(self, view: Any) -> bool | None:
        if view is None:
            return None
        return any(self._mine(m) for m in view)

    def model_pids(self, pids: set[int]) -> set[int] | None:
        if self.blob is None:
            return set()  # not known yet: none of the runners is known to be this model's
        return {p for p in pids if runs_blob(cmdline(p), self.blob)}

    def others_bytes(self) -> int:
        return sum(int(m.get("size_vram") or 0) for m in self.view or () if not self._mine(m))

    def has_demand(self, view: Any) -> bool:
        """Loaded by a client of Ollama's own (a finite ``keep_alive``: the orchestrator's own
        loads keep it forever) while the orchestrator has not loaded it."""
        return self._tier is Tier.DISK and any(
            self._mine(m) and not kept_forever(str(m.get("expires_at", ""))) for m in view or ()
        )

    async def request_load(self, client: httpx.AsyncClient, limit_bytes: int | None) -> None:
        r = await client.post("/api/generate", json={"model": self.model, "keep_alive": -1}, timeout=None)
        check_status(r, "ollama's POST /api/generate (load)", self.name, LoadFailed)

    async def request_release(self, client: httpx.AsyncClient) -> None:
        r = await client.post("/api/generate", json={"model": self.model, "keep_alive": 0})
        check_status(r, "ollama's POST /api/generate (unload)", self.name, UnloadFailed)
        reason = r.json().get("done_reason")
        if reason != "unload":
            raise UnloadFailed(
                self.name, f"ollama answered done_reason={reason!r} to an unload, not 'unload'"
            )

    def release_hint(self, view: Any) -> str:
        if self.view_holds(view):
            return "it still lists the model in /api/ps (a request still using it, or a client reloading it)"
        return "its runner process still holds the memory although /api/ps no longer lists the model"


def create(spec: ModelSpec, *, config: Config, device: Device, log_dir: Path) -> OllamaBackend:
    return OllamaBackend(
        spec, config=config, device=device, log_dir=log_dir, options=options_of(spec, CooperativeOptions)
    )


BACKEND = BackendType(parse=parse, create=create)
