"""Overhead of the daemon's OpenAI-compatible gateway per request, and under concurrent load.

The same requests, side by side in one run, against the same server: once straight to the
model's server, once through the gateway (``vram-orchestrator serve``, attached to that server
with ``base_url``: it resolves the model, takes a lease on it (resident: no switch), proxies the
request and releases the lease), and once through each ``--peer``: another OpenAI-compatible
proxy started in front of the same server (LiteLLM's, for example, installed in its own
environment). The difference to the direct figures is what a proxy costs.

Two measurements, each interleaved in rounds (direct, gateway, peers, direct, ...) so that
drift (other programs, CPU clocks) hits every side alike:

- **sequential**: one request at a time, a plain completion and a streamed one (time to the
  last chunk); the median and p90 per side, after a warm-up. These are latencies.
- **concurrent** (``--clients N``, default 16): N clients on keep-alive connections (opened
  before the clock starts), each sending its next request when its last one is answered;
  throughput (req/s), p50 and p99 latency, and the proxy's CPU time per request, read before
  and after from ``/proc`` for the proxy's whole process group (its threads' run time from
  ``schedstat``, else utime + stime from ``stat``).

The load generator is a few lines of asyncio protocols over raw sockets (uvloop when
installed): a request's time ends in the callback that reads its answer, and the next request
goes out from there, light enough that on a small machine the proxies, not the load, take the
CPU, and that adds no queue of its own to the latencies.

By default the server is benchmarks/fast_openai_server.py (the answers of the tests' fake
OpenAI server from one asyncio protocol: it answers at once, so the overhead is not hidden under
model time, and it is no tail of its own under load); ``--upstream threaded`` uses the tests'
threaded tests/fixtures/fake_openai_server.py instead, whose GIL turns and listen backlog of 5
put a tail of their own on every side (p99 11x p50 straight to it). ``--vllm MODEL_DIR`` serves
a model with the real vLLM CPU server (the flags of tests/integration/test_vllm.py; sequential
only).

``--peer CMD`` (repeatable): a shell command that starts a proxy listening on ``{port}`` in
front of ``{upstream}`` (the server's base URL, no ``/v1``), serving the model as
``bench-llm``; ``{upstream_v1}`` is the base URL with ``/v1``, ``{config_dir}`` a scratch
directory. Three built-in forms: ``litellm:PATH`` runs LiteLLM's proxy (``PATH``: the ``litellm``
of its own virtual environment) with a config naming ``bench-llm`` as ``openai/bench`` at the
server; ``checkout:DIR`` runs ``vram-orchestrator serve`` from another checkout (an older
version, to compare) attached to the server; ``relay`` runs benchmarks/tcp_relay.py, the least
a proxy can do (bytes relayed unread, one server connection per client), whose figures are the
floor under every proxy's on the machine. Every request carries ``Authorization: Bearer
sk-bench`` (LiteLLM's master key there; the gateway on loopback needs none).

``--cpu-probe`` runs benchmarks/cpu_probe.py on every CPU while it measures and reports, per
round, the share of each CPU's samples that ran slow: a saturated proxy's latencies follow its
CPU's speed, which on a VM moves with the host's other tenants.

Run: ``python -m benchmarks.gateway_overhead [--requests 200] [--clients 16] [--peer CMD]
[--cpu-probe] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import select
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from benchmarks import cpu_probe

ROOT = Path(__file__).resolve().parents[1]
FAKE_SERVER = str(ROOT / "tests" / "fixtures" / "fake_openai_server.py")
LEAN = [
    "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4",
    "--enforce-eager", "--kv-cache-memory-bytes", "64M",
]  # fmt: skip
GATEWAY_MODEL = "bench-llm"  # what the gateway (and each peer) is asked for
SERVED_MODEL = "bench"  # what the server itself calls the model
PEER_TOKEN = "sk-bench"  # sent to every side: a peer may require a key (LiteLLM's master key)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(upstream: str | None, vllm_model: str | None, max_concurrent: int) -> dict[str, Any]:
    backend: dict[str, Any]
    if vllm_model is not None:
        backend = {
            "type": "vllm", "model": vllm_model, "served_model": SERVED_MODEL, "args": LEAN,
            "start_timeout_s": 300, "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        }  # fmt: skip
    else:
        backend = {"type": "server", "served_model": SERVED_MODEL, "base_url": upstream}
    return {
        "hardware": {"device": "simulated", "total_vram_gb": 16, "safe_max_vram_gb": 15.5},
        "switching": {"load_timeout_s": 400},
        "monitor": {"sample_hz": 0, "footprints_path": None},
        "models": {
            GATEWAY_MODEL: {
                "kind": "llm", "vram_gb": 11.5, "max_concurrent": max_concurrent, "backend": backend,
            }
        },
    }  # fmt: skip


def wait_for_line(proc: subprocess.Popen[bytes], marker: str, what: str, timeout_s: float = 60) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.1)[0]:
            line = proc.stdout.readline().decode()
            if marker in line:
                return line
            if not line:
                break
            seen.append(line)
    proc.kill()
    raise SystemExit(f"{what} did not start:\n{''.join(seen[-20:])}")


# ``--pin``: the CPUs the proxies run on, and the CPUs of everything else (the load
# generator, the server). None: no pinning.
PINS: tuple[set[int], set[int]] | None = None


def pin_cpus() -> tuple[set[int], set[int]]:
    """The last CPU this process may run on for the proxies, the others for the rest."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit(f"--pin needs at least 2 CPUs; this process may use {len(cpus)}")
    return {cpus[-1]}, set(cpus[:-1])


def _on(cpus: set[int] | None) -> Any:
    """A ``preexec_fn`` that pins the child to ``cpus`` (None: leaves it as it is)."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def _proxy_cpus() -> set[int] | None:
    return PINS[0] if PINS is not None else None


def _other_cpus() -> set[int] | None:
    return PINS[1] if PINS is not None else None


def start_daemon(config_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "serve", "--config", str(config_path), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        preexec_fn=_on(_proxy_cpus()),
    )  # fmt: skip
    line = wait_for_line(proc, " on http", "the daemon")
    return proc, line.split(" on ")[1].split()[0]


def start_fake_server(kind: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    server = [FAKE_SERVER] if kind == "threaded" else ["-m", "benchmarks.fast_openai_server"]
    proc = subprocess.Popen(
        [sys.executable, *server, "--port", str(port), "--model", SERVED_MODEL],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, start_new_session=True,
        preexec_fn=_on(_other_cpus()),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc, "the fake OpenAI server")
    return proc, url


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout_s: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before it answered {url}")
        try:
            auth = {"authorization": f"Bearer {PEER_TOKEN}"}
            if httpx.get(url, timeout=2, headers=auth).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} did not answer {url} within {timeout_s:g} s")


def peer_command(cmd: str, config_dir: Path) -> str:
    """A ``--peer`` as a shell command: the two built-in forms written out, else ``cmd``."""
    kind, _, where = cmd.partition(":")
    if kind == "litellm" and where:
        # LiteLLM's proxy (its own environment's ``litellm``): bench-llm is openai/bench at the
        # server; it refuses to start without a master key, and fetches a cost map unless told.
        (config_dir / "litellm.yaml").write_text(
            "model_list:\n  - model_name: bench-llm\n    litellm_params:\n      model: openai/bench\n"
            "      api_base: {upstream_v1}\n      api_key: none\n"
        )
        return (
            f"LITELLM_MASTER_KEY={PEER_TOKEN} LITELLM_LOCAL_MODEL_COST_MAP=True exec {shlex.quote(where)} "
            "--config {config_dir}/litellm.yaml --host 127.0.0.1 --port {port}"
        )
    if kind == "relay" and not where:
        # The least a proxy can do (benchmarks/tcp_relay.py): the floor under every proxy's figures.
        return (
            f"cd {shlex.quote(str(ROOT))} && exec {shlex.quote(sys.executable)} -m benchmarks.tcp_relay "
            f"{{port}} {{upstream}} --rename {GATEWAY_MODEL}={SERVED_MODEL}"
        )
    if kind == "checkout" and where:
        # Another checkout of vram-orchestrator (an older version, say), on this Python.
        peer_config = config("{upstream}", None, 64)
        (config_dir / "peer.json.in").write_text(json.dumps(peer_config))
        return (
            f"cd {shlex.quote(where)} && PYTHONPATH={shlex.quote(where)} exec {shlex.quote(sys.executable)} "
            "-m orchestrator serve --config {config_dir}/peer.json --port {port}"
        )
    return cmd


def start_peer(cmd: str, upstream: str, config_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = peer_command(cmd, config_dir)
    fields = {"port": port, "upstream": upstream, "upstream_v1": upstream + "/v1", "config_dir": config_dir}
    for template in config_dir.glob("*.in"):  # a built-in peer's config, its placeholders filled
        template.with_suffix("").write_text(template.read_text().replace("{upstream}", upstream))
    for written in config_dir.glob("*.yaml"):
        written.write_text(written.read_text().format(**fields))
    line = cmd.format(**fields)
    proc = subprocess.Popen(
        line,
        shell=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_on(_proxy_cpus()),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/v1/models", proc, f"the peer ({shorten_cmd(cmd)})")
    except BaseException:
        stop(proc)
        raise
    return proc, url


def start_probe(cpu: int, out: Path) -> tuple[int, subprocess.Popen[bytes], Path]:
    """A ``benchmarks.cpu_probe`` on ``cpu``, writing its samples to ``out`` when stopped."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.cpu_probe", "--cpu", str(cpu), "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, start_new_session=True,
    )  # fmt: skip
    return cpu, proc, out


def read_probe(proc: subprocess.Popen[bytes], out: Path) -> list[tuple[float, float]]:
    stop(proc)
    if not out.exists():
        raise SystemExit(f"the CPU probe exited with {proc.returncode} and wrote no samples to {out}")
    return [(t, s) for t, s in json.loads(out.read_text())]


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def shorten_cmd(cmd: str) -> str:
    return cmd if len(cmd) <= 60 else cmd[:57] + "..."


SCHEDSTAT = Path("/proc/self/schedstat").exists()  # threads' run time in ns (most Linux kernels)


def _run_time_s(pid: str) -> float:
    """The CPU time so far of every live thread of process ``pid``
    (``/proc/<pid>/task/<tid>/schedstat``, its first field: nanoseconds)."""
    total_ns = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0  # (the process is gone)
    for tid in tids:
        try:
            total_ns += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # (the thread is gone)
    return total_ns / 1e9


def group_cpu_s(pgid: int) -> float:
    """CPU seconds of every live process in process group ``pgid``: its threads' run time
    (``schedstat``, exact) where the kernel keeps it, else utime + stime from
    ``/proc/<pid>/stat`` (clock ticks of 10 ms, coarse for a few fast requests)."""
    total_s = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[2]) == pgid:  # field 5: pgrp
            if SCHEDSTAT:
                total_s += _run_time_s(entry)
            else:
                total_s += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14, 15: utime, stime
    return total_s


# -- the load generator -------------------------------------------------------------------------


def request_bytes(base: str, model: str, stream: bool, max_tokens: int) -> tuple[str, int, bytes]:
    host_port = base.removeprefix("http://")
    host, _, port = host_port.partition(":")
    body = json.dumps(
        {"model": model, "prompt": "one two three", "max_tokens": max_tokens, "stream": stream}
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host_port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {PEER_TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return host, int(port), head + body


def response_end(buf: bytes | bytearray) -> tuple[int, int] | None:
    """Where the first HTTP/1.1 response in ``buf`` ends (Content-Length or chunked), and its
    status; None while it is incomplete."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    lines = bytes(buf[:head_end]).split(b"\r\n")
    status = int(lines[0].split()[1])
    length = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    at = head_end + 4
    if length is not None:
        return (at + length, status) if len(buf) >= at + length else None
    if not chunked:
        raise RuntimeError("a response without Content-Length or chunked encoding")
    while True:
        line_end = buf.find(b"\r\n", at)
        if line_end < 0:
            return None
        size = int(bytes(buf[at:line_end]).split(b";")[0], 16)
        at = line_end + 2 + size + 2
        if len(buf) < at:
            return None
        if size == 0:
            return at, status


@dataclass
class Run:
    latencies_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float | None = None
    span_s: tuple[float, float] = (0.0, 0.0)  # when it ran (time.monotonic(), the probes' clock)

    @property
    def rate(self) -> float:
        return len(self.latencies_ms) / self.wall_s if self.wall_s else 0.0


@dataclass
class _Load:
    """What the clients of one ``load`` share: the requests left, and the end."""

    run: Run
    left: int
    done: asyncio.Future[None]
    busy: set[_LoadClient] = field(default_factory=set)
    error: BaseException | None = None

    def finished(self, c: _LoadClient) -> None:
        self.busy.discard(c)
        if not self.busy and not self.done.done():
            self.done.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():  # (connections closed after the end are no failure)
            self.error = exc
            self.done.set_result(None)


class _LoadClient(asyncio.Protocol):
    """One keep-alive client of ``load``: its next request goes out from the callback that
    read the end of the last answer."""

    def __init__(self, raw: bytes, shared: _Load) -> None:
        self.raw, self.shared = raw, shared
        self.buf = bytearray()
        self.t0 = 0.0
        self.transport: Any = None

    def attach(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self) -> None:
        shared = self.shared
        if shared.left <= 0 or shared.done.done():
            shared.finished(self)
            return
        shared.left -= 1
        self.t0 = time.perf_counter()
        self.transport.write(self.raw)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            end = response_end(self.buf)
        except (ValueError, IndexError, RuntimeError) as exc:
            self.shared.fail(RuntimeError(f"a broken answer ({exc}): {bytes(self.buf[:200])!r}"))
            return
        if end is None:
            return
        t1 = time.perf_counter()
        at, status = end
        del self.buf[:at]
        if status != 200:
            self.shared.fail(RuntimeError(f"answered {status}"))
            return
        self.shared.run.latencies_ms.append((t1 - self.t0) * 1e3)
        self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.shared.fail(exc or ConnectionError("the server closed the connection"))


async def load(target: tuple[str, int, bytes], clients: int, n: int) -> Run:
    """``n`` requests from ``clients`` concurrent keep-alive connections, timed from when
    every connection is open (a connection's setup is not a request's latency).

    Each client is an asyncio protocol (``_LoadClient``): a request's time ends in the
    callback that reads its answer's last bytes, and the next request is written from there,
    so the generator adds no task switch or stream buffering of its own to what it measures
    (asyncio streams, used before, put a p99 of 3x the p50 on a direct call under 16 clients;
    these callbacks 1.4-1.6x)."""
    host, port, raw = target
    loop = asyncio.get_running_loop()
    shared = _Load(Run(), n, loop.create_future())
    conns = [
        await loop.create_connection(lambda: _LoadClient(raw, shared), host, port) for _ in range(clients)
    ]
    for transport, c in conns:
        c.attach(transport)  # (uvloop calls connection_made after create_connection returns)
    # The load generator's own pauses would be every side's tail: no collection while it
    # runs (what a run allocates is freed when it ends), as timeit does.
    gc.collect()
    gc.disable()
    try:
        t0, start_s = time.perf_counter(), time.monotonic()
        shared.busy.update(c for _, c in conns)
        for _, c in conns:
            c.send()
        await shared.done
        shared.run.wall_s = time.perf_counter() - t0
        shared.run.span_s = (start_s, time.monotonic())
    finally:
        gc.enable()
        for transport, _ in conns:
            transport.close()
    if shared.error is not None:
        raise RuntimeError(f"{host}:{port}: {shared.error}")
    return shared.run


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


@dataclass
class Side:
    label: str
    base: str
    model: str
    pgid: int | None  # the proxy's process group (None: direct)
    seq: dict[bool, list[float]] = field(default_factory=lambda: {False: [], True: []})
    seq_cpu_s: float = 0.0
    seq_n: int = 0
    conc: list[Run] = field(default_factory=list)


async def measure(sides: list[Side], args: argparse.Namespace) -> None:
    rounds = max(1, args.rounds)
    for stream in (False, True):
        targets = [request_bytes(s.base, s.model, stream, args.max_tokens) for s in sides]
        for t in targets:  # warm-up
            await load(t, 1, max(5, args.requests // 10))
        for _ in range(rounds):
            for s, t in zip(sides, targets, strict=True):
                cpu0 = group_cpu_s(s.pgid) if s.pgid else 0.0
                run = await load(t, 1, max(1, args.requests // rounds))
                if s.pgid:
                    s.seq_cpu_s += group_cpu_s(s.pgid) - cpu0
                    s.seq_n += len(run.latencies_ms)
                s.seq[stream].extend(run.latencies_ms)
    if args.clients <= 0 or args.vllm:
        return
    targets = [request_bytes(s.base, s.model, False, args.max_tokens) for s in sides]
    for t in targets:  # warm-up: open the pools
        await load(t, args.clients, args.clients * 4)
    for _ in range(rounds):
        for s, t in zip(sides, targets, strict=True):
            cpu0 = group_cpu_s(s.pgid) if s.pgid else 0.0
            run = await load(t, args.clients, max(args.clients, args.load_requests // rounds))
            if s.pgid:
                run.cpu_s = group_cpu_s(s.pgid) - cpu0
            s.conc.append(run)


def summary(
    sides: list[Side], clients: int, probes: dict[int, list[tuple[float, float]]] | None = None
) -> dict[str, Any]:
    direct = sides[0]
    out: dict[str, Any] = {"clients": clients, "sides": {}}
    full_s = {cpu: cpu_probe.full_speed_s(samples) for cpu, samples in (probes or {}).items()}
    if probes:
        out["cpu_probe_full_speed_us"] = {str(cpu): f * 1e6 for cpu, f in full_s.items()}
    for s in sides:
        entry: dict[str, Any] = {}
        for stream, name in ((False, "completion"), (True, "streamed")):
            v = s.seq[stream]
            entry[name] = {
                "p50_ms": statistics.median(v),
                "p90_ms": pct(v, 0.9),
                "overhead_p50_ms": statistics.median(v) - statistics.median(direct.seq[stream]),
                "n": len(v),
            }
        if s.seq_n:
            entry["sequential_cpu_per_request_ms"] = s.seq_cpu_s / s.seq_n * 1e3
        if s.conc:
            lat = [x for r in s.conc for x in r.latencies_ms]
            n = len(lat)
            wall = sum(r.wall_s for r in s.conc)
            rates = [r.rate for r in s.conc]
            conc: dict[str, Any] = {
                "requests": n,
                "req_per_s": n / wall,
                "req_per_s_rounds": rates,
                "p50_ms": statistics.median(lat),
                "p99_ms": pct(lat, 0.99),
            }
            conc["p99_over_p50"] = conc["p99_ms"] / conc["p50_ms"]
            # Per round too: a burst of other programs on the cores lands in one round.
            conc["p99_over_p50_rounds"] = [
                pct(r.latencies_ms, 0.99) / statistics.median(r.latencies_ms) for r in s.conc
            ]
            if probes:
                # Per round and CPU: the share of the probe's samples that ran slow (the
                # machine's own speed, which every saturated side's latencies follow).
                conc["cpu_slow_share_rounds"] = {
                    str(cpu): [cpu_probe.slow_share(samples, *r.span_s, full_s[cpu]) for r in s.conc]
                    for cpu, samples in probes.items()
                }
            if s.pgid:
                cpu = sum(r.cpu_s or 0.0 for r in s.conc)
                conc["cpu_per_request_ms"] = cpu / n * 1e3
                conc["cpu_busy_fraction"] = cpu / wall
            entry["concurrent"] = conc
        out["sides"][s.label] = entry
    return out


def print_table(result: dict[str, Any]) -> None:
    sides = result["sides"]
    w = max(18, *(len(label) + 1 for label in sides))  # the labels' column
    print(f"  {'':<{w}} {'completion':>22}   {'streamed':>22}")
    print(f"  {'':<{w}} {'p50':>7} {'p90':>7} {'+p50':>7}   {'p50':>7} {'p90':>7} {'+p50':>7}   cpu/req")
    for label, e in sides.items():
        c, st = e["completion"], e["streamed"]
        cpu = e.get("sequential_cpu_per_request_ms")
        print(
            f"  {label:<{w}} {c['p50_ms']:>7.2f} {c['p90_ms']:>7.2f} {c['overhead_p50_ms']:>+7.2f}   "
            f"{st['p50_ms']:>7.2f} {st['p90_ms']:>7.2f} {st['overhead_p50_ms']:>+7.2f}   "
            + (f"{cpu:.2f} ms" if cpu is not None else "-")
        )
    if not any("concurrent" in e for e in sides.values()):
        return
    print(f"\n{result['clients']} concurrent clients, plain completions:\n")
    print(
        f"  {'':<{w}} {'req/s':>8} {'p50':>7} {'p99':>7} {'p99/p50':>8} {'cpu/req':>9}"
        "   req/s per round   p99/p50 per round"
    )
    for label, e in sides.items():
        c = e.get("concurrent")
        if c is None:
            continue
        cpu = c.get("cpu_per_request_ms")
        rounds = " ".join(f"{r:.0f}" for r in c["req_per_s_rounds"])
        rounds += "   " + " ".join(f"{r:.1f}" for r in c["p99_over_p50_rounds"])
        print(
            f"  {label:<{w}} {c['req_per_s']:>8.1f} {c['p50_ms']:>7.2f} {c['p99_ms']:>7.2f} "
            f"{c['p99_over_p50']:>8.2f} "
            + (f"{cpu:>6.2f} ms" if cpu is not None else f"{'-':>9}")
            + f"   {rounds}"
        )
    if "cpu_probe_full_speed_us" not in result:
        return
    print(
        f"\nthe machine's own speed (--cpu-probe): per round, the share of each CPU's probe samples "
        f"that ran at under 1/{cpu_probe.SLOW:g} of full speed"
    )
    for label, e in sides.items():
        c = e.get("concurrent")
        if c is None:
            continue
        per_cpu = "   ".join(
            f"CPU {cpu}: " + " ".join("-" if x is None else f"{x:.0%}" for x in shares)
            for cpu, shares in c["cpu_slow_share_rounds"].items()
        )
        print(f"  {label:<{w}} {per_cpu}")


def versions() -> str:
    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"

    return (
        f"python {platform.python_version()}, starlette {v('starlette')}, uvicorn {v('uvicorn')}, "
        f"httpx {v('httpx')}, h11 {v('h11')}, uvloop {v('uvloop')}, "
        f"httptools {v('httptools')}; {os.cpu_count()} CPUs"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200, help="sequential requests per figure (default 200)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (0: sequential only)")
    p.add_argument(
        "--load-requests", type=int, default=2000, help="requests per side under load (default 2000)"
    )
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds per measurement (default 4)")
    p.add_argument("--vllm", metavar="MODEL_DIR", help="serve this model with the real vLLM CPU server")
    p.add_argument(
        "--upstream",
        choices=("fast", "threaded"),
        default="fast",
        help="the fake server: benchmarks/fast_openai_server.py (asyncio, default) or the tests' "
        "threaded one (tests/fixtures/fake_openai_server.py)",
    )
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--max-concurrent", type=int, default=64, help="the model's max_concurrent (default 64)")
    p.add_argument("--peer", action="append", default=[], metavar="CMD", help="another proxy (see above)")
    p.add_argument("--peer-label", action="append", default=[], metavar="LABEL", help="a name per --peer")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument(
        "--cpu-probe",
        action="store_true",
        help="watch every CPU's own speed while the load runs (benchmarks/cpu_probe.py): a round "
        "whose tail comes from the machine slowing down shows it",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="run the proxies on this process's last CPU and the load generator and the server on "
        "the others (as a load generator is run apart from the system under test)",
    )
    args = p.parse_args(argv)
    all_cpus = sorted(os.sched_getaffinity(0))
    global PINS
    PINS = pin_cpus() if args.pin else None
    if PINS is not None:
        os.sched_setaffinity(0, PINS[1])
    if args.vllm:
        args.requests = min(args.requests, 30)
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
        loader = "uvloop"
    except ImportError:
        loop_factory, loader = None, "asyncio"

    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            upstream = None
            if args.vllm is None:
                server, upstream = start_fake_server(args.upstream)
                procs.append(server)
            path = Path(tmp) / "config.yaml"
            path.write_text(json.dumps(config(upstream, args.vllm, args.max_concurrent)))
            daemon, gateway = start_daemon(path)
            procs.append(daemon)
            import httpx

            with httpx.Client(timeout=600) as client:
                # Make the model resident through a lease, and learn its server's URL.
                lease = client.post(f"{gateway}/v1/leases", json={"model": GATEWAY_MODEL, "ttl_s": 3600})
                lease.raise_for_status()
                direct = lease.json()["url"]
                client.delete(f"{gateway}/v1/leases/{lease.json()['id']}").raise_for_status()
            sides = [
                Side("direct", direct, SERVED_MODEL, None),
                Side("gateway", gateway, GATEWAY_MODEL, daemon.pid),
            ]
            for i, cmd in enumerate(args.peer):
                peer_dir = Path(tmp) / f"peer{i}"
                peer_dir.mkdir()
                proc, url = start_peer(cmd, direct, peer_dir)
                procs.append(proc)
                label = args.peer_label[i] if i < len(args.peer_label) else f"peer {i + 1}"
                sides.append(Side(label, url, GATEWAY_MODEL, proc.pid))
            server_name = (
                "vLLM CPU (" + Path(args.vllm).name + ")"
                if args.vllm
                else f"fake OpenAI server ({args.upstream})"
            )
            pinned = (
                f"; the proxies on CPU {sorted(PINS[0])}, the load generator and the server on CPUs "
                f"{sorted(PINS[1])}"
                if PINS is not None
                else ""
            )
            print(f"gateway overhead, {server_name}; {versions()}; load generator on {loader}{pinned}")
            print(
                f"milliseconds per request; sequential: {args.requests} requests per side and kind, "
                f"interleaved in {args.rounds} rounds (after a warm-up)\n"
            )
            probes = [start_probe(c, Path(tmp) / f"cpu{c}.json") for c in all_cpus] if args.cpu_probe else []
            procs.extend(proc for _, proc, _ in probes)
            runner = asyncio.Runner(loop_factory=loop_factory)
            with runner:
                runner.run(measure(sides, args))
            result = summary(sides, args.clients, {cpu: read_probe(proc, out) for cpu, proc, out in probes})
            result["versions"] = versions()
            # Where each process may run (``--pin``): read back from the processes themselves.
            result["cpus"] = {
                "load generator": sorted(os.sched_getaffinity(0)),
                **{s.label: sorted(os.sched_getaffinity(s.pgid)) for s in sides if s.pgid is not None},
            }
            print_table(result)
            with httpx.Client(timeout=60) as client:
                st = client.get(f"{gateway}/v1/status").json()["statistics"]
            result["gateway_switches"] = st["switches"]
            result["gateway_grants"] = st["grants"]
            print(
                f"\nthe gateway's switches: {st['switches']} (the model stayed resident); "
                f"leases granted: {st['grants']}"
            )
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2))
        finally:
            for proc in reversed(procs):
                stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
