"""Any OpenAI-compatible server process as a model: start, health, crash, stop.

The orchestrator owns the server from start to last child: it is spawned without a shell in
a session (process group) of its own, on 127.0.0.1 and a free port, with its output in a log
file per model; it is ready when ``GET <health_path>`` answers 200 (and, when configured,
``GET /v1/models`` lists the served model); it is stopped with the stop signal to the whole
group, a grace period, then SIGKILL, and waited for until no process of the group is left.
Whatever happens meanwhile (a start that times out, a crash, the orchestrator cancelled
mid-start), no process is left behind. Not even when the orchestrator itself is SIGKILLed:
the server gets its stop signal from the kernel when its parent dies, and every server is
recorded in a state file that the next orchestrator to start reads to reap what is left
(``orchestrator.backends.children``).

A server started by someone else (``base_url`` without ``command``) is attached to: used,
never killed.

Config (``backend:`` mapping of a model)::

    backend:
      type: server
      command: ["python", "-m", "my_server", "--port", "{port}", "--host", "{host}"]
      health_path: /health          # 200 means up
      served_model: my-model        # optional: /v1/models must list it
      port: auto                    # or a fixed port (refused if another process has it)
      start_timeout_s: 120
      stop_signal: SIGTERM
      stop_grace_s: 10
      env: {KEY: value}
      # or, to attach to a running server instead of starting one:
      # base_url: http://127.0.0.1:8000

Placeholders in ``command``: ``{host}``, ``{port}``, ``{model}`` (the served model name),
``{limit_bytes}`` and ``{limit_gib}`` (what the ledger reserved for it).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import IO, TYPE_CHECKING, Any, ClassVar

import anyio
import httpx
from anyio.abc import Process

from orchestrator.backends import children
from orchestrator.backends.base import Backend, BackendType
from orchestrator.backends.children import live_processes as live_processes  # re-exported
from orchestrator.backends.options import OptionError, no_unknown, options_of, positive_seconds
from orchestrator.errors import LoadFailed
from orchestrator.spec import BackendOptions, Config, ModelSpec
from states.ledger import Tier

if TYPE_CHECKING:
    from orchestrator.device.base import Device

LOG_TAIL_LINES = 20
POLL_S = 0.1


@dataclass
class ServerHandle:
    """What a lease on a server model hands out: where it is and a ready client."""

    base_url: str
    client: httpx.AsyncClient
    pid: int | None  # None when attached to a server someone else started
    log_path: Path | None


@dataclass(frozen=True)
class ServerOptions(BackendOptions):
    command: tuple[str, ...] | None
    base_url: str | None
    host: str = "127.0.0.1"
    port: int | None = None  # None: pick a free one
    health_path: str = "/health"
    served_model: str | None = None
    start_timeout_s: float = 120.0
    stop_signal: int = signal.SIGTERM
    stop_grace_s: float = 10.0
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    log_dir: Path | None = None

    KEYS: ClassVar[tuple[str, ...]] = (
        "command", "base_url", "host", "port", "health_path", "served_model", "start_timeout_s",
        "stop_signal", "stop_grace_s", "env", "cwd", "log_dir",
    )  # fmt: skip

    @classmethod
    def parse(cls, opts: Mapping[str, Any]) -> ServerOptions:
        """Validate the ``backend:`` mapping; an ``OptionError`` names the key and the fix."""
        no_unknown(opts, cls.KEYS)
        cmd = opts.get("command")
        if isinstance(cmd, str):
            cmd = shlex.split(cmd)
        if cmd is not None and (
            not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) for c in cmd)
        ):
            raise OptionError("command", f"expected a list of arguments, got {cmd!r}")
        base_url = opts.get("base_url")
        if cmd is None and not base_url:
            raise OptionError(
                "command", "missing: give the command that starts the server, or base_url to attach"
            )
        port = opts.get("port", "auto")
        if port != "auto" and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
            raise OptionError("port", f"expected auto or a port number, got {port!r}")
        sig_name = str(opts.get("stop_signal", "SIGTERM"))
        try:
            sig = signal.Signals[sig_name]
        except KeyError:
            raise OptionError("stop_signal", f"unknown signal {sig_name!r}; use SIGTERM or SIGINT") from None
        env = opts.get("env") or {}
        if not isinstance(env, Mapping):
            raise OptionError("env", f"expected a mapping, got {env!r}")
        return cls(
            command=tuple(cmd) if cmd is not None else None,
            base_url=str(base_url).rstrip("/") if base_url else None,
            host=str(opts.get("host", "127.0.0.1")),
            port=None if port == "auto" else int(port),
            health_path=str(opts.get("health_path", "/health")),
            served_model=str(opts["served_model"]) if opts.get("served_model") else None,
            start_timeout_s=positive_seconds(opts, "start_timeout_s", 120.0),
            stop_signal=int(sig),
            stop_grace_s=positive_seconds(opts, "stop_grace_s", 10.0),
            env=MappingProxyType({str(k): str(v) for k, v in env.items()}),
            cwd=str(opts["cwd"]) if opts.get("cwd") else None,
            log_dir=Path(str(opts["log_dir"])).expanduser() if opts.get("log_dir") else None,
        )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_taken(host: str, port: int) -> bool:
    """Whether another process listens on (or is bound to) the port. Connections of a server
    that is gone (TIME_WAIT, for a minute after it closed them first) do not count: servers
    bind with SO_REUSEADDR, and so does this probe."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def group_members(pgid: int) -> list[int]:
    """The live pids of the process group (empty when it is gone)."""
    return [pid for pid, _, group in live_processes() if group == pgid]


def group_alive(pgid: int) -> bool:
    if os.path.isdir("/proc"):
        return bool(group_members(pgid))
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def log_tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    tail = text.splitlines()[-lines:]
    return "\n".join(tail)


class ServerBackend(Backend):
    """A model served by a server process (or attached to one that is already running)."""

    def __init__(
        self, spec: ModelSpec, *, log_dir: Path, device: Any = None, options: ServerOptions | None = None
    ) -> None:
        super().__init__(spec.name, spec.kind, spec.vram_bytes)
        self.spec = spec
        self.options = options if options is not None else options_of(spec, ServerOptions)
        self.log_dir = self.options.log_dir or log_dir
        self.device = device
        self._proc: Process | None = None
        self._log: IO[bytes] | None = None
        self._log_path: Path | None = None
        self.base_url: str | None = None
        self.started_at: float | None = None
        self.exit_code: int | None = None

    # -- capabilities ------------------------------------------------------------------------

    @property
    def url(self) -> str | None:
        return self.base_url

    @property
    def served_model(self) -> str:
        return self.options.served_model or self.name

    @property
    def attached(self) -> bool:
        return self.options.command is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_at if self.started_at and self.is_alive() else 0.0

    def is_alive(self) -> bool:
        """Its process runs (a server it started), or it is attached (one someone else runs)."""
        if self.attached:
            return self._handle is not None
        return self._proc is not None and self._proc.returncode is None

    # -- sync predicates ---------------------------------------------------------------------

    def measured_bytes(self, *, live_only: bool = True) -> int | None:
        """NVML bytes of the server's process group (None without a per-process reading)."""
        if self._proc is None or self.device is None:
            return 0 if self._proc is None and not self.attached else None
        reading = self.device.read()
        if reading.processes is None:
            return None
        pids = set(group_members(self._proc.pid)) | {self._proc.pid}
        return sum(p.used_bytes or 0 for p in reading.processes if p.pid in pids)

    # -- actions -----------------------------------------------------------------------------

    async def load(self, limit_bytes: int | None = None) -> Any:
        if self._tier is Tier.GPU and self._handle is not None:
            return self._handle
        o = self.options
        if o.command is None:
            assert o.base_url is not None
            self.base_url = o.base_url
            await self._wait_ready(deadline=time.monotonic() + o.start_timeout_s)
            return self._ready(None)
        port = o.port or free_port(o.host)
        if o.port is not None and port_taken(o.host, port):
            raise LoadFailed(
                self.name, f"port {port} on {o.host} is taken by another process; free it or use port: auto"
            )
        values = {
            "host": o.host,
            "port": str(port),
            "model": o.served_model or self.name,
            "limit_bytes": str(limit_bytes or ""),
            "limit_gib": f"{(limit_bytes or 0) / 2**30:.3f}",
        }
        argv = [arg.format(**values) for arg in o.command]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._log_path = self.log_dir / f"{self.name}.log"
        self._log = self._log_path.open("ab")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._log.write(
            f"=== {stamp} vram-orchestrator starts {self.name}: {command_preview(argv)}\n".encode()
        )
        self._log.flush()
        token = children.new_token()  # the server and all its descendants carry it
        env = {**os.environ, **(o.env or {}), children.TOKEN_ENV: token}
        if self.gpus:  # bound to cards on a machine with several: it sees only those
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in self.gpus)
        self.base_url = f"http://{o.host}:{port}"
        # The checks open_process would make, made before the launcher hides them.
        if o.cwd is not None and not os.path.isdir(o.cwd):  # noqa: ASYNC240 - two stats before a start
            self._close_log()
            raise LoadFailed(self.name, f"the working folder {o.cwd} (backend.cwd) does not exist")
        program = find_program(argv[0], o.cwd, env.get("PATH"))
        if program is None:
            self._close_log()
            raise LoadFailed(self.name, f"cannot start {argv[0]!r}: No such file or directory")
        try:
            self._proc = await anyio.open_process(
                children.guarded_command([program, *argv[1:]], o.stop_signal),
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                cwd=o.cwd, env=env, start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            self._close_log()
            raise LoadFailed(self.name, f"cannot start {argv[0]!r}: {exc.strerror}") from None
        self._tier = Tier.GPU  # from here on, unload() has a process to stop
        self.started_at = time.monotonic()
        # Recorded so that a next orchestrator reaps it if this one is SIGKILLed.
        await anyio.to_thread.run_sync(
            children.BOOK.add, self.name, self._proc.pid, token, o.stop_signal, o.stop_grace_s
        )
        await self._wait_ready(deadline=time.monotonic() + o.start_timeout_s)
        return self._ready(self._proc.pid)

    def _ready(self, pid: int | None) -> ServerHandle:
        assert self.base_url is not None
        self._tier = Tier.GPU
        handle = ServerHandle(
            self.base_url, httpx.AsyncClient(base_url=self.base_url, timeout=None), pid, self.log_path
        )
        self._handle = handle
        return handle

    async def _wait_ready(self, deadline: float) -> None:
        o = self.options
        async with httpx.AsyncClient(base_url=self.base_url or "", timeout=2.0) as client:
            while True:
                if self._proc is not None and self._proc.returncode is not None:
                    code = self._proc.returncode
                    raise LoadFailed(
                        self.name,
                        f"the server exited with code {code} before it was ready; last lines of "
                        f"{self.log_path}:\n{log_tail(self.log_path)}",
                    )
                why = await self._not_ready(client)
                if why is None:
                    return
                if time.monotonic() >= deadline:
                    where = (
                        f"; last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                        if self.log_path
                        else ""
                    )
                    raise LoadFailed(self.name, f"{why} within start_timeout_s={o.start_timeout_s:g}{where}")
                await anyio.sleep(POLL_S)

    async def _not_ready(self, client: httpx.AsyncClient) -> str | None:
        """None when ready; otherwise what is missing, for the timeout's message."""
        o = self.options
        health = f"{self.base_url}{o.health_path} did not answer 200"
        try:
            r = await client.get(o.health_path)
            if r.status_code != 200:
                return health
            if o.served_model is None:
                return None
            m = await client.get("/v1/models")
            listed = [d.get("id") for d in m.json().get("data", [])] if m.status_code == 200 else []
            if o.served_model in listed:
                return None
            return f"{self.base_url}/v1/models did not list the served model {o.served_model!r} ({listed})"
        except (httpx.HTTPError, ValueError):
            return health

    async def wait_exit(self) -> str:
        """Return when the server process exits (a crash, unless we stopped it): the reason."""
        proc = self._proc
        if proc is None:
            await anyio.sleep_forever()
        assert proc is not None
        code = await proc.wait()
        self.exit_code = code
        return f"the server process {proc.pid} exited with code {code}; last lines of " + (
            f"{self.log_path}:\n{log_tail(self.log_path)}"
        )

    async def unload(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            with anyio.CancelScope(shield=True):
                await handle.client.aclose()
        if self._proc is not None:
            with anyio.CancelScope(shield=True):
                await self._stop(self._proc)
                await anyio.to_thread.run_sync(children.BOOK.remove, self._proc.pid)
            self._proc = None
        self._close_log()
        self._tier = Tier.DISK

    async def _stop(self, proc: Process) -> None:
        """The stop signal to the whole group, a grace period, SIGKILL, and every member gone."""
        pgid = proc.pid
        if proc.returncode is not None and not group_alive(pgid):
            # Already gone, children included (a crash): its pid may belong to a new process
            # group by now, so no signal is sent at all.
            self.exit_code = proc.returncode
            await proc.aclose()
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, self.options.stop_signal)
        with anyio.move_on_after(self.options.stop_grace_s):
            await proc.wait()
            while group_alive(pgid):  # noqa: ASYNC110 - other members are not our children
                await anyio.sleep(0.02)
        # Whatever is left of the group (the server, or children that outlived it) is killed,
        # and waited for, so that nothing holds GPU memory when we return.
        deadline = time.monotonic() + 5.0
        while (proc.returncode is None or group_alive(pgid)) and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            with anyio.move_on_after(0.05):
                await proc.wait()
        self.exit_code = await proc.wait()
        await proc.aclose()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def status(self) -> dict[str, Any]:
        """The Model Management Module's ``get_llm_status`` fields."""
        return {
            "running": self.is_alive(),
            "pid": self.pid,
            "url": self.base_url,
            "uptime_s": self.uptime_s,
            "vram_bytes": self.measured_bytes(),
            "log": str(self.log_path) if self.log_path else None,
        }


def find_program(name: str, cwd: str | None, path: str | None) -> str | None:
    """The executable ``name`` resolves to (as ``exec`` would: a name with a slash is relative
    to ``cwd``; one without is looked up on ``path``), or None when there is none."""
    if os.sep in name:
        full = name if os.path.isabs(name) else os.path.join(cwd or os.getcwd(), name)
        return full if os.path.isfile(full) and os.access(full, os.X_OK) else None
    return shutil.which(name, path=path)


def command_preview(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def create(spec: ModelSpec, *, config: Config, device: Device, log_dir: Path) -> ServerBackend:
    return ServerBackend(spec, log_dir=log_dir, device=device)


BACKEND = BackendType(parse=ServerOptions.parse, create=create)
