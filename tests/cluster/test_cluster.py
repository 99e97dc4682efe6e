"""A cluster of orchestrators on a local multi-node Ray cluster (``ray.cluster_utils``):
three machines, each a Ray node with one (fake) GPU and its own orchestrator on the simulated
16 GiB card. The Ray cluster and the ``ClusterOrchestrator`` start once for the module; each
test begins with every machine up and nothing loaded.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

ray = pytest.importorskip("ray", reason="the cluster tests need Ray: pip install -e '.[ray]'")

from ray.cluster_utils import Cluster  # noqa: E402

from orchestrator.cluster import (  # noqa: E402
    ClusterError,
    ClusterOrchestrator,
    LeaseLost,
    Machine,
    NoRoute,
    machine_resource,
)
from orchestrator.cluster.gateway import ClusterGateway, create_cluster_app  # noqa: E402
from orchestrator.config import parse_config  # noqa: E402
from orchestrator.errors import AcquireTimeout, LeaseDeadlock  # noqa: E402
from states.routing import Choice  # noqa: E402
from tests.orchestrator.conftest import config_yaml  # noqa: E402

NODES = ("m0", "m1", "m2")
FAKE_SERVER = str(Path(__file__).resolve().parents[1] / "fixtures" / "fake_openai_server.py")
# chat: a small server model (the fake OpenAI server, started by its machine on a free port and
# listening on every address, so that the gateway reaches it at the machine's address)
CHAT = {
    "kind": "llm",
    "vram_gb": 2.0,
    "backend": {
        "type": "server",
        "command": [
            sys.executable,
            FAKE_SERVER,
            "--port",
            "{port}",
            "--model",
            "{model}",
            "--host",
            "0.0.0.0",
        ],
        "served_model": "fake-llm",
        "start_timeout_s": 20,
        "stop_grace_s": 2,
    },
}
MODELS = f"""\
qwen-14b: {{kind: llm, vram_gb: 11.5}}
sdxl-base: {{kind: sdxl, vram_gb: 10.5, offload: true, host_gb: 6.5, max_concurrent: 1}}
gpt-sovits-small: {{kind: tts, vram_gb: 3.5}}
chat: {json.dumps(CHAT)}
"""
ALL_MODELS = ("qwen-14b", "sdxl-base", "gpt-sovits-small", "chat")
DEFAULTS = """\
llm: qwen-14b
sdxl: sdxl-base
tts: gpt-sovits-small
"""
# (the load and unload timeouts of a process: chat's server starts and stops as a program does)
MACHINE_CONFIG = config_yaml(MODELS, DEFAULTS, load_timeout_s=20.0, unload_timeout_s=5.0) + textwrap.dedent(
    """\
    monitor:
      footprints_path: null
    """
)
WITHIN_S = 60.0  # a machine restart or a switch must happen within this


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for name in NODES:
        cluster.add_node(num_cpus=1, num_gpus=1, resources={machine_resource(name): 1})
    ray.init(address=cluster.address, namespace="vram-orchestrator-tests", log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
async def cluster(ray_cluster: Cluster) -> AsyncIterator[ClusterOrchestrator]:
    machines = [Machine(name, config_text=MACHINE_CONFIG) for name in NODES]
    # (the default ttl of 30 s: a renewal, 5 to 10 s after the grant, never reaches a killed
    # machine's restarted actor before its failed snapshot poll has said that the machine went down)
    async with ClusterOrchestrator(machines, start_timeout_s=WITHIN_S) as c:
        yield c


async def until(c: ClusterOrchestrator, predicate: Callable[[], bool], what: str) -> None:
    """Wait for ``predicate`` at each change of the cluster; fail after ``WITHIN_S``."""
    with anyio.move_on_after(WITHIN_S):
        while not predicate():
            await c.changed()
    assert predicate(), f"not true within {WITHIN_S:g} s: {what}"


@pytest.fixture
async def c(cluster: ClusterOrchestrator) -> ClusterOrchestrator:
    """The module's cluster, every machine up, nothing loaded, no lease held."""
    await until(cluster, lambda: all(cluster.alive().values()), "every machine is up")
    for model in ALL_MODELS:
        await cluster.unload(model, timeout=WITHIN_S)

    def settled() -> bool:
        snaps = cluster.machines().values()
        return all(s is not None and not s.ledger.residents and not s.leases for s in snaps)

    await until(cluster, settled, "nothing is resident or leased anywhere")
    return cluster


def resident_on(c: ClusterOrchestrator, model: str) -> set[str]:
    return {n for n, s in c.machines().items() if s is not None and s.ledger.on_gpu(model)}


async def test_routes_to_the_resident_machine(c: ClusterOrchestrator) -> None:
    async with c.acquire("llm", node="m1") as first:
        assert (first.node, first.model, first.card) == ("m1", "qwen-14b", 0)
    async with c.acquire("sdxl", node="m2"):
        pass
    await until(
        c, lambda: resident_on(c, "qwen-14b") == {"m1"} and resident_on(c, "sdxl-base") == {"m2"}, "warm"
    )
    async with c.acquire("qwen-14b") as llm, c.acquire("sdxl") as sdxl:
        assert (llm.node, sdxl.node) == ("m1", "m2")
        assert llm.route is not None and llm.route.choice is Choice.RESIDENT
        assert sdxl.route is not None and sdxl.route.choice is Choice.RESIDENT
    stats = await c.statistics()
    assert stats["m0"]["loads"] == 0  # nothing went to the machine without them


async def test_spills_to_another_machine_when_the_resident_one_is_busy(c: ClusterOrchestrator) -> None:
    async with c.acquire("sdxl", node="m0"):
        pass
    await until(c, lambda: resident_on(c, "sdxl-base") == {"m0"}, "SDXL resident on m0")
    # m0 is busy with an LLM now (its lease held): SDXL waits for no drain, another machine has room
    async with c.acquire("llm", node="m0", owner="chat agent") as llm:
        assert llm.node == "m0"
        with anyio.fail_after(WITHIN_S):
            async with c.acquire("sdxl", owner="artist") as sdxl:
                assert sdxl.node in ("m1", "m2")
                assert sdxl.route is not None and sdxl.route.choice is Choice.ROOM
                # and a second LLM request joins the one resident, not the machine busy with SDXL
                async with c.acquire("llm", owner="another chat agent") as second:
                    assert second.node == "m0"
                    assert second.route is not None and second.route.choice is Choice.RESIDENT


async def test_the_holder_travels_with_its_requests(c: ClusterOrchestrator) -> None:
    async with c.acquire("llm", node="m0") as llm:
        # SDXL on m0 would evict this task's own LLM: routing sends it elsewhere
        async with c.acquire("sdxl") as sdxl:
            assert sdxl.node != "m0"
        # pinned there, m0's own check sees that the same holder holds the LLM
        with pytest.raises(LeaseDeadlock, match="qwen-14b"):
            async with c.acquire("sdxl", node="m0"):
                pass
        assert llm.node == "m0"


async def test_errors_come_back_as_their_own_class(c: ClusterOrchestrator) -> None:
    with pytest.raises(NoRoute, match="no such model or kind"):
        async with c.acquire("no-such-model"):
            pass
    async with c.acquire("sdxl", node="m1"):
        with pytest.raises(AcquireTimeout) as info:
            async with c.acquire("sdxl", node="m1", timeout=0.05, owner="another holder"):
                pass
        assert info.value.model == "sdxl-base" and info.value.timeout_s == pytest.approx(0.05, abs=0.01)
    assert "within" in str(info.value) and isinstance(info.value, TimeoutError)


async def test_a_reservation_goes_where_the_room_is(c: ClusterOrchestrator) -> None:
    async with c.acquire("llm", node="m0"), c.acquire("llm", node="m1"):
        async with c.reserve(8 * 2**30) as r:
            assert r.node == "m2" and r.kind == "external"
            assert r.route is not None and r.route.evictions == 0


async def test_no_lost_request_and_the_budget_on_every_machine(c: ClusterOrchestrator) -> None:
    served: list[tuple[str, str]] = []
    failed: list[BaseException] = []
    kinds = ["llm", "sdxl", "tts"]

    async def agent(i: int) -> None:
        for j in range(4):
            kind = kinds[(i + j) % 3]
            try:
                async with c.acquire(kind, timeout=WITHIN_S) as lease:
                    served.append((kind, lease.node))
                    await anyio.sleep(0.005)  # the work inside the lease
            except Exception as exc:
                failed.append(exc)

    with anyio.fail_after(WITHIN_S):
        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(agent, i)
    assert not failed, failed[:3]
    assert len(served) == 48
    assert len({node for _, node in served}) >= 2  # the work spread over machines
    for node in NODES:
        events = await c.events_of(node)
        assert events, f"no events from {node}"
        over = [e for e in events if e["committed_bytes"] > e["budget_bytes"]]
        assert not over, f"{node} went over its budget: {over[:2]}"
        stats = (await c.statistics())[node]
        assert stats["peak_committed_bytes"] <= stats["budget_bytes"]


async def test_the_gateway_proxies_completions_to_the_serving_machine(c: ClusterOrchestrator) -> None:
    g = ClusterGateway(c, parse_config(MACHINE_CONFIG, source="<gateway config>"), token=None)
    transport = httpx.ASGITransport(app=create_cluster_app(g))
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gateway", timeout=WITHIN_S
        ) as client:
            body = {"model": "chat", "messages": [{"role": "user", "content": "hello cluster"}]}
            r = await client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == "echo: hello cluster"
            r = await client.post(
                "/v1/completions", json={"model": "chat", "prompt": "a b c", "stream": True}
            )
            assert r.status_code == 200 and "data: [DONE]" in r.text
            models = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
            assert models["chat"]["server"] and len(models["chat"]["resident_on"]) == 1
            assert models["sdxl-base"]["server"] is False
            # an in-process model, an unknown one, an endpoint that stays on the machines
            r = await client.post("/v1/chat/completions", json={"model": "sdxl", "messages": []})
            assert r.status_code == 400 and "in-process" in r.json()["error"]["message"]
            r = await client.post("/v1/chat/completions", json={"model": "nope", "messages": []})
            assert r.status_code == 404
            r = await client.post("/v1/images/generations", json={"model": "sdxl", "prompt": "x"})
            assert r.status_code == 501
            status = (await client.get("/v1/status")).json()
            assert set(status["machines"]) == set(NODES) and all(
                m["alive"] for m in status["machines"].values()
            )
    finally:
        g.stopping.set()
        await g.upstreams.aclose()


async def test_a_machine_that_dies_ends_its_leases_and_comes_back(c: ClusterOrchestrator) -> None:
    victim = "m2"
    before: Any = c.machines()[victim]
    async with c.acquire("sdxl", node="m0"), c.acquire("sdxl", node="m1"):
        with pytest.raises(LeaseLost, match=f"machine {victim} went down"), anyio.fail_after(WITHIN_S):
            async with c.acquire("llm", node=victim):
                ray.kill(c.actor(victim), no_restart=False)
                await anyio.sleep_forever()  # until the loss cancels the block
        assert not c.alive()[victim]
        # the next request is served elsewhere: the dead machine is not routed to
        async with c.acquire("tts", timeout=WITHIN_S) as tts:
            assert tts.node in ("m0", "m1")
        await until(c, lambda: c.alive()[victim], f"{victim} restarted")
        # back, and routed to again: the one machine where an LLM evicts no busy SDXL
        async with c.acquire("llm", timeout=WITHIN_S, owner="chat agent") as again:
            assert again.node == victim
            assert again.route is not None and again.route.choice is Choice.ROOM
    after: Any = c.machines()[victim]
    assert after.instance != before.instance  # a fresh orchestrator there


async def test_a_request_waiting_on_a_machine_that_dies_is_served_elsewhere(c: ClusterOrchestrator) -> None:
    release = anyio.Event()
    ended: dict[str, str] = {}
    served: list[str] = []

    async def artist(node: str) -> None:  # holds that machine's one SDXL slot until released
        try:
            async with c.acquire("sdxl", node=node, owner=f"artist on {node}"):
                await release.wait()
            ended[node] = "released"
        except LeaseLost:
            ended[node] = "lost"

    async def latecomer() -> None:
        async with c.acquire("sdxl", owner="latecomer", timeout=WITHIN_S) as lease:
            served.append(lease.node)

    def waited_on() -> list[str]:
        return [v.node for v in c.views() if v.alive and v.waiting.get("sdxl-base")]

    with anyio.fail_after(WITHIN_S):
        async with anyio.create_task_group() as tg:
            for node in NODES:
                tg.start_soon(artist, node)
            await until(c, lambda: sum(v.leases.get("sdxl-base", 0) for v in c.views()) == 3, "3 artists")
            tg.start_soon(latecomer)
            await until(c, lambda: len(waited_on()) == 1, "the latecomer waits on a machine")
            (victim,) = waited_on()
            ray.kill(c.actor(victim), no_restart=False)
            await until(c, lambda: not c.alive()[victim], f"{victim} is down")
            release.set()
    # nothing was granted on the dead machine: the request went to another one, and was served
    assert len(served) == 1 and served[0] != victim
    assert ended[victim] == "lost" and all(ended[n] == "released" for n in NODES if n != victim)
    await until(c, lambda: c.alive()[victim], f"{victim} restarted")


async def test_a_holders_next_request_never_finds_its_last_lease_still_held(c: ClusterOrchestrator) -> None:
    # Each block's end sends its release without waiting for the answer; the next request
    # to that machine carries it, and the machine releases first. Were the LLM's lease still
    # held when SDXL (which must evict it: 11.5 + 10.5 GiB on a 16 GiB card) is asked for by
    # the same holder, the machine's deadlock check would refuse SDXL.
    before = (await c.statistics())["m0"]
    for _ in range(3):
        async with c.acquire("llm", node="m0", owner="one agent") as llm:
            assert llm.node == "m0"
        async with c.acquire("sdxl", node="m0", owner="one agent", timeout=WITHIN_S) as sdxl:
            assert sdxl.node == "m0"
    stats = (await c.statistics())["m0"]  # (after the releases' answers)
    assert stats["grants"] - before["grants"] == stats["releases"] - before["releases"] == 6
    assert stats["switches"] - before["switches"] >= 5
    await until(c, lambda: not c.machines()["m0"].leases, "no lease held on m0")  # type: ignore[union-attr]


async def test_a_grant_that_loaded_brings_the_machines_snapshot(c: ClusterOrchestrator) -> None:
    # nothing is resident after the fixture: this grant loads the LLM on m2, and the router
    # knows it at the grant (the next request is routed on it, not on the snapshot before)
    async with c.acquire("llm", node="m2") as llm:
        snap: Any = c.machines()["m2"]
        assert snap.ledger.on_gpu("qwen-14b") and llm.id in snap.lease_ids
        view = next(v for v in c.views() if v.node == "m2")
        assert view.leases == {"qwen-14b": 1}  # the grant, counted once


async def test_a_release_goes_out_without_a_next_request(c: ClusterOrchestrator) -> None:
    # nothing follows the block on m1: its release still goes out (at the next turn of the
    # event loop), and another holder waiting for m1's one SDXL slot gets it
    got = anyio.Event()

    async def second() -> None:
        async with c.acquire("sdxl", node="m1", owner="second", timeout=WITHIN_S):
            got.set()

    with anyio.fail_after(WITHIN_S):
        async with anyio.create_task_group() as tg:
            async with c.acquire("sdxl", node="m1", owner="first"):
                tg.start_soon(second)
                await until(
                    c, lambda: any(v.node == "m1" and v.waiting for v in c.views()), "the second waits on m1"
                )
            await got.wait()
        await c.released("m1")
    assert not c._machines["m1"].releasing


@ray.remote(num_cpus=0)
def _lost_release(lease_id: str) -> None:
    raise ConnectionError(f"the release of {lease_id} never reached the machine")


class _ReleasesLost:
    """A machine's actor handle whose release calls are lost on the way (as when the router's
    process ends right after a block); every other call goes through."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.lost: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    @property
    def release(self) -> Any:
        outer = self

        class Release:
            def remote(self, lease_id: str) -> Any:
                outer.lost.append(lease_id)
                return _lost_release.remote(lease_id)

        return Release()


async def test_a_lease_whose_release_is_lost_ends_at_its_ttl(c: ClusterOrchestrator) -> None:
    # a second router on the same machines, with a short ttl
    machines = [Machine(name, config_text=MACHINE_CONFIG) for name in NODES]
    async with ClusterOrchestrator(machines, ttl_s=1.0, stop_machines=False, start_timeout_s=WITHIN_S) as r2:
        link = r2._machines["m2"]
        lossy = _ReleasesLost(link.handle)
        link.handle = lossy
        try:
            async with r2.acquire("tts", node="m2") as tts:
                pass
            with anyio.fail_after(WITHIN_S):
                await r2.released("m2")  # the answer (an error) came back: nothing waits on it
        finally:
            link.handle = lossy._handle
        assert lossy.lost == [tts.id]
        # the lease is no longer renewed: the machine ends it at its ttl, and says so
        await until(c, lambda: not c.machines()["m2"].leases, "m2 ended the lease")  # type: ignore[union-attr]
        expired = [e for e in await c.events_of("m2") if e["kind"] == "lease_expired"]
        assert any(tts.id in e.get("detail", "") for e in expired), expired[-3:]


async def test_a_lease_held_past_its_ttl_is_renewed(c: ClusterOrchestrator) -> None:
    machines = [Machine(name, config_text=MACHINE_CONFIG) for name in NODES]
    async with ClusterOrchestrator(machines, ttl_s=0.6, stop_machines=False, start_timeout_s=WITHIN_S) as r2:
        async with r2.acquire("tts", node="m1") as a, r2.acquire("llm", node="m1") as b:
            await anyio.sleep(4 * 0.6)  # the work: four ttls long
            assert (await r2.actor("m1").ended.remote(a.id)) is None
            assert (await r2.actor("m1").ended.remote(b.id)) is None
        await r2.released()
    expired = [e for e in await c.events_of("m1") if e["kind"] == "lease_expired"]
    assert not [e for e in expired if a.id in e.get("detail", "") or b.id in e.get("detail", "")]


async def test_a_machine_that_dies_between_grant_and_release(c: ClusterOrchestrator) -> None:
    victim = "m1"
    before: Any = c.machines()[victim]
    async with c.acquire("tts", node=victim) as tts:
        assert tts.node == victim
        ray.kill(c.actor(victim), no_restart=False)  # and the block ends before anyone notices
    with anyio.fail_after(WITHIN_S):
        await c.released(victim)  # its answer came back (an error, or the release): no leak here
    assert not c._machines[victim].releasing
    await until(
        c,
        lambda: c.alive()[victim] and c.machines()[victim].instance != before.instance,  # type: ignore[union-attr]
        f"{victim} restarted",
    )
    assert not c.machines()[victim].leases  # type: ignore[union-attr]
    async with c.acquire("tts", node=victim, timeout=WITHIN_S) as again:
        assert again.node == victim


async def test_a_machine_whose_config_is_wrong_says_so(ray_cluster: Cluster) -> None:
    # (no GPU asked for: the module's own actor on m0 holds that machine's one GPU)
    bad = Machine("m0", config_text="models: {x: {kind: llm, vram_gb: 1}}", num_gpus=0)
    with pytest.raises(ClusterError, match=r"m0: machine m0: its config is not valid: .*hardware"):
        async with ClusterOrchestrator(
            [bad], namespace="vram-orchestrator-tests-bad", start_timeout_s=WITHIN_S
        ):
            pass
