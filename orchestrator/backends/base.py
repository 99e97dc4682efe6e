"""The backend protocol: sync predicates, async actions (httpcore's interfaces split).

The orchestrator's executor is the only caller of the actions, one at a time per backend,
under the switch lock. The contract each backend keeps:

- ``load(limit_bytes)`` brings the model from disk onto the GPU and returns the live handle
  that leases hand out (``lease.handle``). It must not hold more than ``limit_bytes`` (what the
  ledger reserved for it): a model larger than its estimate fails with an out-of-memory that
  says how much it needed (vLLM's ``--gpu-memory-utilization`` and torch's per-process memory
  fraction are such caps). If it raises or is cancelled, the executor calls ``unload()``
  (shielded, with a deadline) to release whatever was partly allocated.
- ``unload()`` drops the model from every tier. It is idempotent: unloading an unloaded
  model does nothing. It returns once the backend has let go; the executor then waits for
  the device to show the memory released.
- ``offload(Tier.HOST)`` frees the GPU copy and keeps a host copy (only when
  ``supports_host_tier``); ``offload(Tier.DISK)`` drops the host copy.
- ``restore()`` brings a host copy back onto the GPU and returns the handle.
- Blocking work (torch, diffusers) runs in worker threads, never on the event loop.

What the rest of the orchestrator may ask of any backend without knowing its class (the
daemon's gateway, ``status``, the module's ``ServiceController``) are capabilities,
properties with safe defaults here: ``url``, ``served_model``, ``pid``, ``log_path``,
``attached``, ``can_sleep``, ``cached``, ``uptime_s`` and ``is_alive()``. A backend with a
server process overrides them. ``watch_demand`` is the one background capability: a task the
orchestrator runs for each backend while it runs (most return at once). ``held_outside_bytes``
and ``adopt`` let the executor take over, in place, a copy of the model that its own program
holds although the orchestrator did not load it (the default: there is never one).

A backend *type* (``backend: {type: NAME}`` in a config) is a ``BackendType``: the parser of
its options and its factory, named by one line of ``orchestrator.backends.registry``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from orchestrator.spec import BackendOptions, Config, ModelSpec
from states.ledger import Tier

if TYPE_CHECKING:
    from orchestrator.device.base import Device


class Backend(abc.ABC):
    """One model's loader. Subclasses implement the four actions."""

    #: a name for this model's memory in logs and on the simulated device
    owner: str

    def __init__(self, name: str, kind: str, estimate_bytes: int) -> None:
        self.name = name
        self.kind = kind
        self.estimate_bytes = estimate_bytes
        self.owner = name
        self._handle: Any = None
        self._tier = Tier.DISK
        self.gpus: tuple[int, ...] = ()  # the cards it was last bound to (empty: the config's one)

    # -- sync predicates -------------------------------------------------------------------

    @property
    def supports_host_tier(self) -> bool:
        return False

    @property
    def tier(self) -> Tier:
        return self._tier

    def is_loaded(self) -> bool:
        return self._tier is Tier.GPU

    @property
    def handle(self) -> Any:
        """The live object a lease hands out; None unless loaded."""
        return self._handle if self._tier is Tier.GPU else None

    # -- capabilities (what others may ask without knowing the class) -----------------------

    @property
    def url(self) -> str | None:
        """The base URL of the model's OpenAI-compatible server (``http://host:port``, no
        ``/v1``); None when it has none, or none is running yet."""
        return None

    @property
    def served_model(self) -> str | None:
        """The model name its server expects in a request's ``"model"``; None when the backend
        is not a server (an in-process model). Known before it is loaded."""
        return None

    @property
    def pid(self) -> int | None:
        """The model's own process (the server it started); None when it has none."""
        return None

    @property
    def log_path(self) -> Path | None:
        """Where the model's own process writes its output; None when it has none."""
        return None

    @property
    def attached(self) -> bool:
        """A server someone else started: used, never stopped or killed."""
        return False

    @property
    def can_sleep(self) -> bool:
        """It keeps a host copy through its server's sleep mode (vLLM's ``/sleep``)."""
        return False

    @property
    def cached(self) -> bool:
        """Its next cold load comes from a packed disk cache, not from the source
        (``orchestrator.backends.diskcache``)."""
        return False

    @property
    def uptime_s(self) -> float:
        """How long its own process has been running (0.0 without one)."""
        return 0.0

    @property
    def host_copy_portable(self) -> bool:
        """Its host copy may be restored onto another card than the one it left (an
        in-process model: its tensors go to any device; a sleeping server's is bound to the
        card its process runs on)."""
        return False

    def bind(self, gpus: tuple[int, ...], devices: tuple[Device, ...]) -> None:
        """Load onto cards ``gpus`` from now on (``devices``: their readings, in that order).
        The orchestrator calls it on a machine with several cards, before each load or
        restore. A backend that reads a device reads its first card's."""
        self.gpus = gpus
        if hasattr(self, "device"):
            setattr(self, "device", devices[0])  # noqa: B010 - kept where each backend reads it

    def is_alive(self) -> bool:
        """Loaded and able to serve: for a model with a process of its own, whether that
        process runs; for an attached server, whether it is attached."""
        return self.is_loaded()

    def measured_bytes(self, *, live_only: bool = True) -> int | None:
        """What the model really holds on the device now; None if the backend cannot tell.

        ``live_only=False`` adds memory on its way back (a server process that is exiting,
        a release the driver has not finished): the release wait waits for that too.
        """
        return None

    def peak_bytes(self) -> int | None:
        """The most it held since loaded (loads and uses), if the backend can tell."""
        return None

    async def held_outside_bytes(self) -> int | None:
        """What the model's own program holds of it on the GPU now although the orchestrator
        did not load it (loaded by hand in the program, or there already when the orchestrator
        attached), read from the program; None when it holds none or the backend cannot tell.
        The executor adopts such a copy in place when it fits (``adopt``), or unloads it."""
        return None

    def adopt(self) -> Any:
        """Take the copy ``held_outside_bytes`` reported as loaded, in place, without loading
        anything, and return the handle leases hand out. Only the executor calls it, at once
        after ``held_outside_bytes`` gave bytes and the ledger took them."""
        raise TypeError(f"{type(self).__name__} has no copy held outside the orchestrator to adopt")

    # -- async actions ---------------------------------------------------------------------

    @abc.abstractmethod
    async def load(self, limit_bytes: int | None = None) -> Any:
        """Load from disk; never hold more than ``limit_bytes`` on the device (fail instead)."""

    @abc.abstractmethod
    async def unload(self) -> None: ...

    async def offload(self, tier: Tier) -> None:
        if tier is Tier.DISK:
            await self.unload()
            return
        raise TypeError(f"{type(self).__name__} keeps no host copy; unload() it instead")

    async def restore(self, limit_bytes: int | None = None) -> Any:
        return await self.load(limit_bytes)

    async def wait_exit(self) -> str:
        """Return (with the reason) when the loaded model dies on its own: a server process
        that exits. Backends without a process of their own never return."""
        await anyio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    async def watch_demand(self, hold: Callable[..., AbstractAsyncContextManager[Any]]) -> None:
        """Run while the orchestrator runs: where the model's own program takes requests that
        never pass through the orchestrator (ComfyUI's queue, a model loaded by hand in
        Ollama), hold a lease on the model on that program's behalf with ``hold``
        (``Orchestrator.acquire``) for as long as the program shows the demand. Backends
        whose models are used only through the orchestrator return at once."""
        return

    async def aclose(self) -> None:
        """Release everything for good (the orchestrator is shutting down)."""
        await self.unload()


class BackendFactory(Protocol):
    def __call__(self, spec: ModelSpec, *, config: Config, device: Device, log_dir: Path) -> Backend: ...


@dataclass(frozen=True)
class BackendType:
    """One ``backend: {type: ...}``: how its options are parsed (once, when the config is read;
    an ``OptionError`` names the bad key) and how a backend is made from a parsed spec (a
    ``ConfigError`` when it cannot run on this device)."""

    parse: Callable[[Mapping[str, Any]], BackendOptions]
    create: BackendFactory
