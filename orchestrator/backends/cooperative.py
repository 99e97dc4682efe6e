"""Programs people already run, as models: the orchestrator asks them to give memory back.

Ollama, llama.cpp's router, ComfyUI and SGLang each hold models on the GPU and each has its
own call to let go of them. A *cooperative* backend is one model of one such program (the
program, and the model's name as the program knows it): the orchestrator plans with the
model's estimate (the config's ``vram_gb``, then what it measured), and

- **loads** it with the program's own load call (Ollama: a generate request with
  ``keep_alive: -1`` and no prompt; the llama.cpp router: ``POST /models/load``; SGLang:
  ``POST /resume_memory_occupation``; ComfyUI: nothing, its next prompt loads what it needs),
  then waits until the program's own view (``/api/ps``, ``/models``) shows the model;
- **evicts** it with the program's own release call, then waits, with a deadline
  (``release_timeout_s``), until the program's processes hold what they should on the
  device (NVML by pid on a GPU): nothing of this model, beyond the program's idle memory
  (``idle_gb``: a CUDA context) and what its own view gives to its other models. A program
  that ignores the call, or says it let go but did not, fails closed: ``VRAMNotReleased``
  names the program, its pids and the bytes, the model stays in the ledger at its size, and
  nothing is loaded into memory that is not free;
- **watches** it while it is resident: the program's view is read every ``poll_s``; a program
  that stops answering, is restarted (another pid listens on its port) or no longer lists the
  model (unloaded by hand, or by its own timer) makes the model leave the ledger at once, as a
  crashed server does, and its leases end with ``BackendCrashed``.

- **takes over** what the program holds of the model outside the ledger (an attached program
  that had it loaded already, a model loaded by hand): such a copy counts as on the GPU
  (``tier``), never as another program's memory; the orchestrator adopts it in place
  (``held_outside_bytes``, ``adopt``: no load, the ledger counts it at what it holds, or at its
  estimate when larger) when the ledger with it fits the budget and the exclusive kinds, and
  otherwise gives it back through the program's release call (and loads it again within the
  budget when it is wanted);
- **serves the program's own demand** (``watch_demand``, attached programs only): the
  program's view is read every ``poll_s``, and while it shows work that never came through the
  orchestrator (ComfyUI's queue, an Ollama model a client loaded), a lease is held on the
  model on its behalf.

Either the orchestrator starts the program (``command``; with the program's own settings set
so that it never unloads on its own, e.g. ``OLLAMA_KEEP_ALIVE=-1``), and stops it when the
orchestrator stops, or it attaches to one already running (``url``) and never stops or kills
it. Its pids are, when started, the process it started and its descendants; when attached,
the process listening on the URL's port (``/proc/net/tcp``) and its descendants. A program on
another machine (or a device that cannot list processes) cannot be measured: its release is
then believed on the program's word, and its memory is what the config says.

Options every program type takes (``backend:`` of a model)::

    model: qwen2.5:7b            # the model's name as the program knows it (not for comfyui)
    url: http://127.0.0.1:11434  # attach to a running program; or, to start one:
    command: [ollama, serve]     # placeholders {host} {port} {model}; port: auto or a number
    env: {}                      # more environment for a started program
    start_timeout_s: 120         # a started program answers within this
    stop_grace_s: 10             # then SIGKILL, when the orchestrator stops it
    release_timeout_s: 30        # the release must show on the device within this
    poll_s: 0.5                  # how often a resident model's program is looked at
    idle_gb: 0.0                 # what the program holds with nothing loaded (its CUDA context)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

import anyio
import httpx

from orchestrator.backends.base import Backend
from orchestrator.backends.cooperative_options import CooperativeOptions
from orchestrator.backends.procs import listening_pid, with_descendants
from orchestrator.backends.server import ServerBackend, ServerHandle, free_port
from orchestrator.device.base import DeviceOutOfMemory
from orchestrator.errors import BackendError, ConfigError, LoadFailed, VRAMNotReleased
from orchestrator.spec import Config, ModelSpec
from states.ledger import Tier
from states.units import format_gib

if TYPE_CHECKING:
    from orchestrator.device.base import Device

logger = logging.getLogger("orchestrator.cooperative")

POLL_S = 0.02  # how often a load or a release is looked at while it is under way
HTTP_TIMEOUT_S = 30.0


def error_text(r: httpx.Response) -> str:
    """What a program said when it refused a call: its ``error`` (string or object), else the
    start of the body."""
    try:
        body = r.json()
    except ValueError:
        return r.text[:200] or r.reason_phrase
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        err = err.get("message", err)
    return str(err if err is not None else body)[:300]


class CooperativeBackend(Backend):
    """One model of a program that gives memory back through its own API (see the module).

    Subclasses say how the program shows what it holds (``read_view``, ``view_holds``), how
    it is asked to load and to release (``request_load``, ``request_release``) and, where the
    program runs a process per model, which processes hold this one (``model_pids``).
    """

    #: where the program's own view of what it holds is read, for messages
    VIEW: ClassVar[str] = "its API"
    #: the release call, for messages
    RELEASE: ClassVar[str] = "the release call"

    def __init__(
        self,
        spec: ModelSpec,
        *,
        config: Config,
        device: Device | None,
        log_dir: Path,
        options: CooperativeOptions,
    ) -> None:
        super().__init__(spec.name, spec.kind, spec.vram_bytes)
        self.options = options
        self.program = options.program
        self.model = options.model
        self.device = device
        self.owner = f"{self.program}:{self.model or spec.name}"
        unload_s = config.unload_timeout_s
        if options.release_timeout_s is not None and options.release_timeout_s >= unload_s:
            raise ConfigError(
                config.source,
                f"models.{spec.name}.backend.release_timeout_s",
                f"{options.release_timeout_s:g} s is not shorter than "
                f"switching.unload_timeout_s={unload_s:g}",
                "lower it (the unload deadline must leave room for the verified release and a second try)",
            )
        self.release_timeout_s = options.release_timeout_s or 0.4 * unload_s
        self._server = ServerBackend(spec, log_dir=log_dir, device=device, options=options.server)
        self._root: int | None = None  # the program's main process, once found
        self.view: Any = None  # what the program last said it holds
        self._holding = False  # a lease is held on the program's behalf (watch_demand)

    # -- capabilities ------------------------------------------------------------------------

    @property
    def url(self) -> str | None:
        return self._server.base_url or self.options.server.base_url

    @property
    def served_model(self) -> str:
        return self.model or self.name

    @property
    def attached(self) -> bool:
        return self.options.attached

    @property
    def pid(self) -> int | None:
        return self._root

    @property
    def log_path(self) -> Path | None:
        return self._server.log_path

    @property
    def uptime_s(self) -> float:
        return self._server.uptime_s

    def is_alive(self) -> bool:
        return self.is_loaded() and self._server.is_alive()

    # -- what the program holds ----------------------------------------------------------------

    def program_pids(self) -> set[int]:
        """The program's processes: its main process and everything below it."""
        if self._root is None:
            return set()
        return with_descendants([self._root])

    def model_pids(self, pids: set[int]) -> set[int] | None:
        """Which of the program's processes hold this model (a runner per model); None when
        the program holds all its models in the same processes."""
        return None

    def others_bytes(self) -> int:
        """What the program's own view gives to its models other than this one."""
        return 0

    def by_pid(self) -> dict[int, int] | None:
        """Device bytes of each of the program's processes; None when they cannot be read
        (a device without a process list, a program on another machine)."""
        if self.device is None or self._root is None:
            return None
        reading = self.device.read()
        if reading.processes is None:
            return None
        pids = self.program_pids()
        return {p.pid: p.used_bytes or 0 for p in reading.processes if p.pid in pids}

    def measured_bytes(self, *, live_only: bool = True) -> int | None:
        """What the program's processes hold for this model on the device."""
        held = self.by_pid()
        if held is None:
            return None if self._root is not None or self._tier is Tier.GPU else 0
        mine = self.model_pids(set(held))
        if mine is not None:
            return sum(held.get(p, 0) for p in with_descendants(mine))
        return max(0, sum(held.values()) - self.options.idle_bytes - self.others_bytes())

    def describe_holder(self) -> str:
        pids = sorted(self.program_pids())
        where = f"{self.program} at {self.url}"
        if self._root is None:
            return where
        more = f"; its processes {', '.join(map(str, pids))}" if len(pids) > 1 else ""
        return f"{where} (pid {self._root}{more})"

    @property
    def tier(self) -> Tier:
        """Where the model is: the program's holding of it counts even when the orchestrator
        did not load it (attached, it was there already, or loaded by hand), so that the
        ledger never treats the model's own memory as someone else's: such a copy is a
        leftover, given back through the program's release call before the model is loaded
        within the budget."""
        if self._tier is Tier.DISK and self._root is not None and self.holds_outside():
            return Tier.GPU
        return self._tier

    def holds_outside(self) -> bool:
        """The program holds this model although the orchestrator has not loaded it."""
        return self.view_holds(self.view) is True and bool(self.measured_bytes())

    def has_demand(self, view: Any) -> bool:
        """The program has work for this model that did not come through the orchestrator."""
        return False

    # -- what subclasses provide -----------------------------------------------------------------

    async def read_view(self, client: httpx.AsyncClient) -> Any:
        """The program's own account of what it holds (raises ``httpx.HTTPError`` when it
        does not answer)."""
        r = await client.get(self.options.server.health_path)
        r.raise_for_status()
        return None

    def view_holds(self, view: Any) -> bool | None:
        """Whether the view lists this model as loaded; None when the program cannot say."""
        return None

    def view_failed(self, view: Any) -> str | None:
        """Why a load the program gave up on failed (its own words), or None."""
        return None

    async def request_load(self, client: httpx.AsyncClient, limit_bytes: int | None) -> None:
        """Ask the program to load the model (it may answer before it is done)."""

    async def request_release(self, client: httpx.AsyncClient) -> None:
        """Ask the program to let go of the model (it may answer before it is done)."""

    def release_hint(self, view: Any) -> str:
        """What may have kept the memory, for the error's message."""
        return f"{self.program} did not give the memory back after {self.RELEASE}"

    # -- the program itself ----------------------------------------------------------------------

    def _client(self, timeout: float = HTTP_TIMEOUT_S) -> httpx.AsyncClient:
        assert self.url is not None
        return httpx.AsyncClient(base_url=self.url, timeout=timeout)

    def _find_root(self) -> int | None:
        if not self.attached:
            return self._server.pid
        parts = urlsplit(self.url or "")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return listening_pid(parts.hostname or "", port, hint=self._root)

    async def _ensure_program(self) -> None:
        """Start the program (or attach to it) unless it is up; find its main process."""
        if not self._server.is_alive():
            if not self.attached:
                with anyio.CancelScope(shield=True):
                    await self._server.unload()  # what is left of a program that died
                o = self.options.server
                port = o.port or free_port(o.host)
                values = {"host": o.host, "port": str(port), "model": self.served_model}
                env = {k: v.format(**values) for k, v in (o.env or {}).items()}
                self._server.options = dataclasses.replace(o, port=port, env=MappingProxyType(env))
            await self._server.load()
        self._root = await anyio.to_thread.run_sync(self._find_root)

    def _program_gone(self) -> bool:
        """The program we started has exited (an attached one: never known to be gone)."""
        return not self.attached and not self._server.is_alive()

    # -- actions ---------------------------------------------------------------------------------

    async def load(self, limit_bytes: int | None = None) -> Any:
        if self._tier is Tier.GPU and self._handle is not None:
            return self._handle
        await self._ensure_program()
        async with self._client() as client:
            self.view = await self.read_view(client)
            if self.view_holds(self.view) is not True:
                self._tier = Tier.GPU  # from here on, unload() has something to release
                await self.request_load(client, limit_bytes)
                while True:
                    self.view = await self.read_view(client)
                    if self.view_holds(self.view) is not False:
                        break
                    failed = self.view_failed(self.view)
                    if failed is not None:
                        raise LoadFailed(self.name, failed)
                    if self._program_gone():
                        raise LoadFailed(self.name, f"{self.program} exited while loading {self.model}")
                    await anyio.sleep(POLL_S)
        self._tier = Tier.GPU
        held = self.measured_bytes()
        if limit_bytes and held is not None and held > limit_bytes:
            # The program took more than the ledger reserved: give it back (the executor
            # unloads) and plan with what it really takes from now on.
            raise DeviceOutOfMemory(self.owner, held, limit_bytes, limit=True)
        return self._new_handle()

    def _new_handle(self) -> ServerHandle:
        assert self.url is not None
        handle = ServerHandle(
            self.url, httpx.AsyncClient(base_url=self.url, timeout=None), self._root, self.log_path
        )
        self._handle = handle
        return handle

    async def held_outside_bytes(self) -> int | None:
        """What the program holds of the model although the orchestrator has not loaded it,
        read from the program now (its view, then its processes on the device)."""
        if self._tier is not Tier.DISK or self.url is None or self._program_gone():
            return None
        await self._ensure_program()  # attached: as a load attaches (is_alive() follows it)
        if self._root is None:
            return None
        async with self._client() as client:
            self.view = await self.read_view(client)
        return self.measured_bytes(live_only=True) if self.holds_outside() else None

    def adopt(self) -> ServerHandle:
        """The program's copy becomes the loaded model, as if ``load()`` had found it there:
        unloading it is the program's release call, and it is watched like a loaded one."""
        if self._tier is not Tier.DISK:
            raise TypeError(f"{self.name} is loaded already: there is nothing to adopt")
        self._tier = Tier.GPU
        return self._new_handle()

    async def unload(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            with anyio.CancelScope(shield=True):
                await handle.client.aclose()
        if self._program_gone() or self.url is None:
            self._tier = Tier.DISK  # its memory went with its processes (the device shows it)
            return
        if self._root is None:
            self._root = await anyio.to_thread.run_sync(self._find_root)
        async with self._client() as client:
            try:
                self.view = await self.read_view(client)
            except httpx.HTTPError:
                if self.attached and await anyio.to_thread.run_sync(self._find_root) is None:
                    self._tier = Tier.DISK  # nobody listens any more: the program is gone
                    return
                raise
            if self.view_holds(self.view) is False and not self.measured_bytes(live_only=False):
                self._tier = Tier.DISK  # nothing to give back
                return
            await self.request_release(client)
            await self._wait_released(client)
        self._tier = Tier.DISK

    async def _wait_released(self, client: httpx.AsyncClient) -> None:
        """Until the program's processes hold nothing of this model (and its view no longer
        lists it), within ``release_timeout_s``; ``VRAMNotReleased`` otherwise."""
        t0 = time.monotonic()
        while True:
            with contextlib.suppress(httpx.HTTPError):
                self.view = await self.read_view(client)
            held = self.measured_bytes(live_only=False)
            listed = self.view_holds(self.view)
            if not held and listed is not True:
                return
            if self._program_gone():
                return
            if time.monotonic() - t0 >= self.release_timeout_s:
                what = (
                    f"still holds {format_gib(held)} of {self.model or self.name}"
                    if held
                    else (f"still lists {self.model} as loaded in {self.VIEW}")
                )
                raise VRAMNotReleased(
                    self.name,
                    f"{self.describe_holder()} {what} {self.release_timeout_s:g} s after {self.RELEASE}: "
                    f"{self.release_hint(self.view)}; the model stays counted at its size and nothing "
                    "is loaded into that memory until it is back",
                )
            await anyio.sleep(POLL_S)

    async def wait_exit(self) -> str:
        """Return (the reason) when the program no longer holds the model: it exited or stops
        answering, was restarted, or its own view no longer lists the model."""
        misses = 0
        async with self._client(timeout=max(2.0, self.options.poll_s * 4)) as client:
            while True:
                await anyio.sleep(self.options.poll_s)
                if self._program_gone():
                    code = self._server._proc.returncode if self._server._proc is not None else None
                    self._tier = Tier.DISK
                    return f"{self.describe_holder()} exited with code {code}"
                try:
                    view = await self.read_view(client)
                except httpx.HTTPError as exc:
                    misses += 1
                    if misses >= 2:
                        self._tier = Tier.DISK
                        return f"{self.program} at {self.url} stopped answering ({type(exc).__name__})"
                    continue
                misses = 0
                root = await anyio.to_thread.run_sync(self._find_root)
                if root is not None and self._root is not None and root != self._root:
                    old, self._root = self._root, root
                    self._tier = Tier.DISK
                    return f"{self.program} at {self.url} was restarted (pid {old}, now {root})"
                self.view = view
                if self.view_holds(view) is False:
                    self._tier = Tier.DISK
                    return (
                        f"{self.describe_holder()} no longer lists {self.model} in {self.VIEW} "
                        "(unloaded outside the orchestrator, or by the program's own timer)"
                    )

    async def watch_demand(self, hold: Callable[..., AbstractAsyncContextManager[Any]]) -> None:
        """An attached program's view, read every ``poll_s`` while the orchestrator runs (so
        that ``tier`` and ``measured_bytes`` follow what the program holds); while it shows
        demand of its own (``has_demand``), a lease on the model is held on its behalf."""
        if not self.attached:
            return  # a program we started is reached only through us
        async with (
            anyio.create_task_group() as tg,
            self._client(timeout=max(2.0, self.options.poll_s * 4)) as client,
        ):
            while True:
                await anyio.sleep(self.options.poll_s)
                try:
                    view = await self.read_view(client)
                except httpx.HTTPError:
                    continue
                if self._tier is Tier.DISK:  # (while resident, wait_exit tells a restart apart)
                    self._root = await anyio.to_thread.run_sync(self._find_root)
                self.view = view
                if not self._holding and self.has_demand(view):
                    self._holding = True
                    tg.start_soon(self._hold_for_program, hold)

    async def _hold_for_program(self, hold: Callable[..., AbstractAsyncContextManager[Any]]) -> None:
        try:
            async with hold(self.name):
                logger.info(
                    "%s has work of its own for %s: holding it on its behalf", self.program, self.name
                )
                while self.has_demand(self.view):  # noqa: ASYNC110 - the view is the program's, polled above
                    await anyio.sleep(self.options.poll_s)
        except Exception as exc:  # the program's demand could not be served: said, then retried
            logger.warning("%s: serving %s's own demand failed: %s", self.name, self.program, exc)
            await anyio.sleep(max(1.0, self.options.poll_s))
        finally:
            self._holding = False

    async def aclose(self) -> None:
        try:
            if self._tier is not Tier.DISK:
                await self.unload()
        except (BackendError, httpx.HTTPError) as exc:
            if self.attached:
                raise
            logger.warning("%s: %s; stopping %s frees it", self.name, exc, self.program)
        finally:
            # A program we started stops with us; an attached one only loses its client.
            await self._server.unload()
            self._root = None  # no longer ours to account for


def check_status(r: httpx.Response, what: str, model: str, action: type[BackendError]) -> None:
    """A refused call is the project's error, in the program's own words."""
    if r.status_code != 200:
        raise action(model, f"{what} answered {r.status_code}: {error_text(r)}")
