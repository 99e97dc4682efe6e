"""The daemon's handlers in process (httpx's ASGI transport): what issue-tracker findings
broke, each refused with a 4xx in OpenAI's error shape, and nothing loaded for it."""

from __future__ import annotations

import json
import re
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.daemon.conftest import TOKEN, write_config
from tests.daemon.inproc import Running, running_daemon
from tests.orchestrator.conftest import wait_until

pytestmark = pytest.mark.anyio

GIB = 2**30
LIMITS = {"max_input_chars": 100, "max_steps": 30, "max_width": 512, "max_height": 512, "max_n": 2}


def models() -> dict[str, Any]:
    return {
        "qwen-14b": {"kind": "llm", "vram_gb": 11.5, "limits": {"max_tokens": 256}},
        "sdxl-base": {"kind": "sdxl", "vram_gb": 10.5, "limits": LIMITS},
        "tts-small": {"kind": "tts", "vram_gb": 3.5, "aliases": ["voice"], "limits": LIMITS},
    }


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, models=models())


def error_of(r: httpx.Response) -> dict[str, Any]:
    """The body of an error answer, which must be OpenAI's shape and never a server error."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code"} and err["code"] == r.status_code
    assert "Traceback" not in r.text
    return dict(err)


def nothing_loaded(run: Running) -> bool:
    return run.orch.ledger().committed_bytes == 0 and run.device.owned_bytes() == 0


async def test_reading_endpoints_and_models_retrieve(config: Path) -> None:
    async with running_daemon(config) as run:
        c = run.client
        assert (await c.get("/health")).json() == {"status": "ok"}
        listed = (await c.get("/v1/models")).json()["data"]
        assert [m["id"] for m in listed] == ["qwen-14b", "sdxl-base", "tts-small"]
        one = await c.get("/v1/models/tts-small")  # the openai client's models.retrieve
        assert one.status_code == 200 and one.json() == listed[2]
        assert (await c.get("/v1/models/voice")).json()["id"] == "tts-small"  # an alias
        err = error_of(await c.get("/v1/models/gpt-9"))
        assert err["type"] == "model_not_found" and "gpt-9" in err["message"]
        status = (await c.get("/v1/status")).json()
        assert status["running"] is True and status["instance"] == run.daemon.leases.instance_id
        err = error_of(await c.get("/v1/nothing"))
        assert err["code"] == 404 and "no such endpoint" in err["message"]
        err = error_of(await c.put("/v1/status"))
        assert err["code"] == 405


async def test_lease_ids_are_unguessable_and_a_restarted_daemon_refuses_the_old_ones(
    tmp_path: Path, config: Path
) -> None:
    """Finding 2: ids counted from 1 again after a restart, so a client of the first run
    renewed and then released another client's lease on the second."""
    async with running_daemon(config) as first:
        a = (await first.client.post("/v1/leases", json={"bytes": GIB, "ttl_s": 30})).json()["id"]
        a2 = (await first.client.post("/v1/leases", json={"bytes": GIB, "ttl_s": 30})).json()["id"]
        instance = first.daemon.leases.instance_id
    async with running_daemon(config) as second:  # the daemon restarted
        c = second.client
        b = (await c.post("/v1/leases", json={"bytes": GIB, "ttl_s": 30})).json()["id"]
        assert len({a, a2, b}) == 3
        for lease_id in (a, a2, b):
            assert re.fullmatch(r"lease-[0-9a-f]{8}-[A-Za-z0-9_-]{16}", lease_id), lease_id
        assert second.daemon.leases.instance_id != instance
        assert a.startswith(f"lease-{instance}-") and b.startswith(
            f"lease-{second.daemon.leases.instance_id}-"
        )
        for r in (await c.post(f"/v1/leases/{a}/renew"), await c.delete(f"/v1/leases/{a}")):
            err = error_of(r)
            assert r.status_code == 410 and "restarted" in err["message"] and instance in err["message"]
        # B's lease is untouched by A's renew and release.
        assert [x["id"] for x in (await c.get("/v1/leases")).json()["data"]] == [b]
        err = error_of(await c.post("/v1/leases/lease-1/renew"))
        assert err["code"] == 410 and "no lease 'lease-1' was issued by this daemon" in err["message"]
        assert (await c.delete(f"/v1/leases/{b}")).json()["released"] is True
        err = error_of(await c.post(f"/v1/leases/{b}/renew"))
        assert err["code"] == 410 and "released by its holder" in err["message"]


POSTS = [
    "/v1/leases",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/images/generations",
    "/v1/audio/speech",
]


async def test_bad_input_is_a_4xx_never_a_500(config: Path) -> None:
    """Finding 4: deep JSON, infinite numbers and lone surrogates gave 500s."""
    async with running_daemon(config) as run:
        c = run.client
        deep = b'{"model": "llm", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        for path in POSTS:
            err = error_of(await c.post(path, content=deep))
            assert "nests deeper" in err["message"], path
            err = error_of(await c.post(path, content=b'{"model": "tts", "input": "hi", "x": 1e309}'))
            assert "not finite" in err["message"], path
            err = error_of(await c.post(path, content=b'{"model": "tts", "x": NaN}'))
            assert "not finite" in err["message"], path
        for value in ("inf", "-inf", "1e309", "nan"):
            r = await c.post("/v1/audio/speech", json={"input": "hi"}, headers={"x-vram-priority": value})
            assert "X-VRAM-Priority" in error_of(r)["message"]
        r = await c.post("/v1/images/generations", content=b'{"prompt": "a \\ud800 fox"}')
        assert "prompt is not valid Unicode" in error_of(r)["message"]
        r = await c.post("/v1/audio/speech", content=b'{"input": "\\udfff"}')
        assert "input is not valid Unicode" in error_of(r)["message"]
        r = await c.post("/v1/chat/completions", content=b'{"model": "\\ud800", "messages": []}')
        assert "not valid Unicode" in error_of(r)["message"]
        # A 100 KB model name is refused and echoed cut short (finding 8).
        for path in POSTS:
            extra = {} if path == "/v1/leases" else {"prompt": "p", "input": "i", "messages": []}
            r = await c.post(path, json={"model": "m" * 100_000, **extra})
            err = error_of(r)
            assert r.status_code == 404 and len(r.content) < 500, (path, len(r.content))
            assert "100000 characters" in err["message"]
        assert nothing_loaded(run) and run.settled()


async def test_a_lone_surrogate_holder_cannot_break_status_or_leases(config: Path) -> None:
    """Finding 5: a lease held by "\\ud800" made /v1/status and /v1/leases answer 400."""
    async with running_daemon(config) as run:
        c = run.client
        r = await c.post("/v1/leases", content=b'{"bytes": 1024, "holder": "\\ud800"}')
        assert "holder is not valid Unicode" in error_of(r)["message"]
        assert (await c.get("/v1/status")).status_code == 200
        assert (await c.get("/v1/leases")).json()["data"] == []
        # Non-ASCII that is valid is kept, and every listing still encodes.
        r = await c.post("/v1/leases", json={"bytes": 1024, "holder": "Zoë's trainer ✓", "ttl_s": 30})
        assert r.status_code == 200, r.text
        assert (await c.get("/v1/leases")).json()["data"][0]["holder"] == "Zoë's trainer ✓"
        assert (await c.get("/v1/status")).json()["leases"][0]["holder"] == "Zoë's trainer ✓"
        assert (await c.delete(f"/v1/leases/{r.json()['id']}")).status_code == 200


async def test_work_over_a_models_limits_is_refused_before_anything_loads(config: Path) -> None:
    """Findings 1 and 6: a 10,000-character speech input, a 400-step or 1024x1024 image."""
    async with running_daemon(config) as run:
        c = run.client
        cases: list[tuple[str, dict[str, Any], str]] = [
            (
                "/v1/audio/speech",
                {"model": "voice", "input": "x" * 10_000},
                "tts-small.limits.max_input_chars",
            ),
            ("/v1/images/generations", {"prompt": "p", "steps": 400}, "sdxl-base.limits.max_steps"),
            ("/v1/images/generations", {"prompt": "p", "size": "1024x256"}, "sdxl-base.limits.max_width"),
            ("/v1/images/generations", {"prompt": "p", "size": "256x1024"}, "sdxl-base.limits.max_height"),
            ("/v1/images/generations", {"prompt": "p", "n": 3}, "sdxl-base.limits.max_n"),
            (
                "/v1/audio/speech",
                {"model": "tts-small", "input": "x" * 101},
                "tts-small.limits.max_input_chars",
            ),
        ]
        for path, body, key in cases:
            err = error_of(await c.post(path, json=body))
            assert err["code"] == 400 and err["type"] == "limit_exceeded", err
            assert f"models.{key}" in err["message"] and "raise" in err["message"], err
        # At the limits the request runs (the simulated models make no media: 501 after loading).
        r = await c.post("/v1/audio/speech", json={"model": "voice", "input": "x" * 100})
        assert r.status_code == 501
        assert nothing_loaded(run) is False  # that one did load its model
        await wait_until(run.settled, what="the lease of the request at the limit ended")


async def test_an_image_request_for_an_llm_is_refused_before_anything_loads(config: Path) -> None:
    """Finding 8: it loaded the LLM first and then answered 501 (which clients retry)."""
    async with running_daemon(config) as run:
        c = run.client
        err = error_of(await c.post("/v1/images/generations", json={"model": "llm", "prompt": "a cat"}))
        assert err["code"] == 400 and "makes no images" in err["message"] and "sdxl" in err["message"]
        err = error_of(await c.post("/v1/audio/speech", json={"model": "sdxl", "input": "hi"}))
        assert err["code"] == 400 and "makes no speech" in err["message"]
        err = error_of(await c.post("/v1/completions", json={"model": "tts", "prompt": "hi"}))
        assert "/v1/audio/speech" in err["message"]
        assert nothing_loaded(run) and run.orch.statistics().loads == 0


async def test_the_bearer_scheme_is_case_insensitive(config: Path) -> None:
    async with running_daemon(config, token=TOKEN) as run:
        c = run.client
        for scheme in ("Bearer", "bearer", "BEARER"):
            r = await c.get("/v1/status", headers={"authorization": f"{scheme} {TOKEN}"})
            assert r.status_code == 200, scheme
        r = await c.get("/v1/status", headers={"authorization": "bearer wrong-token"})
        assert r.status_code == 401 and "wrong bearer token" in r.json()["error"]["message"]
        r = await c.get("/v1/status", headers={"authorization": f"Basic {TOKEN}"})
        assert r.status_code == 401


async def test_a_body_that_stops_short_of_its_content_length_gets_408(config: Path) -> None:
    """Finding 8: Content-Length 100 and 10 bytes sent held the connection with no deadline."""
    async with running_daemon(config, body_timeout_s=0.3) as run:
        app = run.app
        sent: list[MutableMapping[str, Any]] = []
        arrived = anyio.Event()
        parts = [{"type": "http.request", "body": b'{"bytes": ', "more_body": True}]

        async def receive() -> MutableMapping[str, Any]:
            if parts:
                return parts.pop(0)
            await arrived.wait()  # the client sends nothing more (and does not disconnect)
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/v1/leases", "raw_path": b"/v1/leases", "query_string": b"",
            "root_path": "", "headers": [(b"content-length", b"100"), (b"host", b"daemon")],
            "client": ("127.0.0.1", 5000), "server": ("daemon", 80),
        }  # fmt: skip
        t0 = anyio.current_time()
        with anyio.fail_after(5):
            await app(scope, receive, send)
        arrived.set()
        assert anyio.current_time() - t0 < 3
        assert sent[0]["status"] == 408
        body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
        assert "did not arrive within 0.3 s" in body["error"]["message"] and "100" in body["error"]["message"]
        assert run.settled()


async def test_stopping_answers_the_requests_in_flight_in_the_json_shape(config: Path) -> None:
    async with running_daemon(config) as run:
        c = run.client
        held = (await c.post("/v1/leases", json={"bytes": 10 * GIB, "ttl_s": 30})).json()
        answers: list[httpx.Response] = []

        async def waiting() -> None:
            answers.append(await c.post("/v1/leases", json={"bytes": 10 * GIB, "ttl_s": 30}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiting)
            await wait_until(lambda: len(run.orch.external_reservations()) == 2, what="the second one waits")
            run.daemon.stopping.set()
        err = error_of(answers[0]) if answers[0].status_code < 500 else answers[0].json()["error"]
        assert answers[0].status_code == 503 and err["type"] == "shutting_down", answers[0].text
        assert (await c.get("/health")).json() == {"status": "stopping"}
        assert "shutting down" in (await c.post("/v1/leases", json={"bytes": 1})).json()["error"]["message"]
        assert (await c.delete(f"/v1/leases/{held['id']}")).status_code == 200


async def test_status_on_two_cards_lists_each_card() -> None:
    """/v1/status on a machine with two cards: each card's budget, committed bytes, residents
    and state, and the card each model is on."""
    from orchestrator import Orchestrator
    from orchestrator.config import parse_config
    from orchestrator.daemon import Daemon, LeaseManager, create_app

    config = parse_config(
        json.dumps(
            {
                "hardware": {
                    "device": "simulated",
                    "gpus": [
                        {"index": 0, "total_vram_gb": 24, "safe_max_vram_gb": 23},
                        {"index": 1, "total_vram_gb": 16, "safe_max_vram_gb": 15},
                    ],
                },
                "simulation": {"time_scale": 0.001},
                "monitor": {"sample_hz": 0, "footprints_path": None},
                "models": {
                    "qwen-14b": {"kind": "llm", "vram_gb": 11.5, "gpus": [0]},
                    "sdxl-base": {"kind": "sdxl", "vram_gb": 10.5, "gpus": [1]},
                },
            }
        ),
        source="<two cards>",
    )
    async with Orchestrator(config) as orch, LeaseManager(orch, config.daemon) as leases:
        d = Daemon(orch, leases, config.daemon, None)
        transport = httpx.ASGITransport(app=create_app(d))
        async with httpx.AsyncClient(transport=transport, base_url="http://daemon") as c:
            lease = (await c.post("/v1/leases", json={"model": "sdxl-base"})).json()
            status = (await c.get("/v1/status")).json()
            assert [(x["index"], x["budget_bytes"]) for x in status["cards"]] == [
                (0, 23 * GIB),
                (1, 15 * GIB),
            ]
            card0, card1 = status["cards"]
            assert card0["residents"] == [] and card0["state"] == "IDLE" and card0["committed_bytes"] == 0
            assert card1["residents"] == ["sdxl-base"] and card1["state"] == "SDXL_ACTIVE"
            assert card1["committed_bytes"] == int(10.5 * GIB) == status["committed_bytes"]
            assert {m["name"]: m["gpus"] for m in status["models"]} == {"qwen-14b": [], "sdxl-base": [1]}
            assert status["budget_bytes"] == 38 * GIB and status["running"] is True
            assert (await c.delete(f"/v1/leases/{lease['id']}")).status_code == 200
        d.stopping.set()
        await d.upstreams.aclose()
