"""Fuzzing the daemon's ASGI app in process: hypothesis makes request bodies, headers and
paths; no answer is a server error or carries a traceback, and afterwards a normal request
succeeds, no lease is left and the ledger says what the device holds.

A few hundred examples by default (CI); more on demand::

    VRAM_ORCHESTRATOR_FUZZ_EXAMPLES=20000 pytest tests/daemon/test_fuzz.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import anyio
import httpx
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.daemon.conftest import TOKEN, write_config
from tests.daemon.inproc import Running, running_daemon

EXAMPLES_ENV = "VRAM_ORCHESTRATOR_FUZZ_EXAMPLES"
EXAMPLES = int(os.environ.get(EXAMPLES_ENV, "500"))
GIB = 2**30

PATHS = [
    "/health", "/v1/status", "/v1/models", "/v1/models/llm", "/v1/models/qwen-14b", "/metrics",
    "/v1/events?follow=0", "/v1/events?history=1&follow=0", "/v1/leases", "/v1/leases/lease-1",
    "/v1/leases/lease-1/renew", "/v1/leases/lease-0badc0de-AAAAAAAAAAAAAAAA/renew",
    "/v1/chat/completions", "/v1/completions", "/v1/images/generations", "/v1/audio/speech",
]  # fmt: skip
NAMES = [
    "llm",
    "sdxl",
    "tts",
    "voice",
    "qwen-14b",
    "sdxl-base",
    "tts-small",
    "gpt-9",
    "",
    "\ud800",
    "m" * 300,
]
KEYS = [
    "model", "bytes", "priority", "timeout", "ttl_s", "pid", "holder", "prompt", "n", "size", "steps",
    "seed", "response_format", "input", "messages", "stream", "max_tokens",
]  # fmt: skip
TEMPLATES: list[dict[str, Any]] = [  # valid bodies, of which the fuzzing changes one field
    {"bytes": 1024, "ttl_s": 0.5, "timeout": 0.2, "holder": "fuzz"},
    {"model": "voice", "ttl_s": 0.5, "timeout": 0.2},
    {"model": "tts", "input": "hello"},
    {"model": "sdxl", "prompt": "a fox", "size": "64x64", "steps": 2, "n": 1},
    {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
]
SPECIAL_NUMBERS = ["inf", "-inf", "nan", "1e309", "-1", "0", "1e308", "99999999999999999999", "2.5", " 3 "]


def weighted(
    often: st.SearchStrategy[Any], rarely: st.SearchStrategy[Any], p: float
) -> st.SearchStrategy[Any]:
    """``often`` with probability about ``p``, else ``rarely``."""
    return st.integers(min_value=0, max_value=99).flatmap(lambda i: often if i < p * 100 else rarely)


def json_values() -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats()  # NaN and infinities included: json.dumps writes them as NaN/Infinity
        | st.text(max_size=20)
        | st.sampled_from(NAMES)
        | st.integers(min_value=0, max_value=20 * GIB)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
        max_leaves=10,
    )


def bodies() -> st.SearchStrategy[bytes | None]:
    structured = st.dictionaries(st.sampled_from(KEYS), json_values(), max_size=6).map(
        lambda d: json.dumps(d).encode()
    )
    deep = st.integers(min_value=1, max_value=5000).map(
        lambda n: b'{"model": "llm", "bytes": 1, "x": ' + b"[" * n + b"]" * n + b"}"
    )
    escaped = st.sampled_from(["\\ud800", "\\udfff", "\\u0000", "\\ud83d\\ude00", "\u00e9"]).flatmap(
        lambda esc: st.sampled_from(["holder", "prompt", "input", "model"]).map(
            lambda key: f'{{"{key}": "a{esc}b", "bytes": 1, "input": "x", "prompt": "y"}}'.encode()
        )
    )
    numbers = st.sampled_from(["1e309", "-1e309", "NaN", "Infinity", "-Infinity", "1" * 5000]).flatmap(
        lambda num: st.sampled_from(["bytes", "timeout", "ttl_s", "n", "priority"]).map(
            lambda key: f'{{"{key}": {num}, "model": "llm"}}'.encode()
        )
    )
    near_valid = st.tuples(st.sampled_from(TEMPLATES), st.sampled_from(KEYS), json_values()).map(
        lambda t: json.dumps({**t[0], t[1]: t[2]}).encode()
    )
    return weighted(
        near_valid, st.none() | st.binary(max_size=300) | structured | deep | escaped | numbers, 0.4
    )


def headers() -> st.SearchStrategy[dict[str, str]]:
    printable = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
    values = printable | st.sampled_from(SPECIAL_NUMBERS)
    good = st.sampled_from([f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER  {TOKEN}"])
    bad = st.sampled_from(["Bearer nope", "Basic x", "", f"Bearer{TOKEN}", f"Token {TOKEN}"])
    auth = weighted(good, bad, 0.9)
    return st.fixed_dictionaries(
        {"authorization": auth},
        optional={
            "x-vram-priority": values,
            "x-vram-timeout": st.sampled_from(["0", "0.1", "1", "-1", "inf", "nan", "1e309", "x"]),
            "content-type": st.sampled_from(["application/json", "text/plain", "", "multipart/form-data"]),
        },
    )


POSTS = [
    "/v1/leases",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/images/generations",
    "/v1/audio/speech",
]


def targets() -> st.SearchStrategy[tuple[str, str]]:
    """(method, path): mostly a POST with a body to an endpoint that reads one."""
    junk = st.text(
        alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FFF, exclude_characters="?#\x7f")
    )
    paths = st.sampled_from(PATHS) | junk.map(lambda s: "/v1/" + s) | junk.map(lambda s: "/v1/leases/" + s)
    anything = st.tuples(st.sampled_from(["GET", "POST", "DELETE", "PUT"]), paths)
    posts = st.tuples(st.just("POST"), st.sampled_from(POSTS))
    return weighted(posts, anything, 0.75)


def check(r: httpx.Response) -> None:
    """No server error: the 5xx a correct daemon gives here are a lease that could not be had
    within the timeout the request asked for (503 timeout) and the simulated models' media
    (501: they make no images or speech)."""
    assert "Traceback" not in r.text and 'File "' not in r.text, r.text[:2000]
    if r.status_code >= 500:
        err = r.json()["error"]
        assert (r.status_code, err["type"]) in {(503, "timeout"), (501, "not_implemented")}, r.text[:2000]
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith("application/json"), r.text[:2000]
        err = r.json()["error"]
        assert set(err) == {"message", "type", "code"} and err["code"] == r.status_code, r.text[:2000]


async def one(
    run: Running, method: str, path: str, hdrs: dict[str, str], body: bytes | None
) -> httpx.Response:
    with anyio.fail_after(20):
        return await run.client.request(method, path, headers=hdrs, content=body)


async def cleanup(run: Running) -> None:
    """Release what the fuzzing left (as its clients would), then check the daemon is whole."""
    auth = {"authorization": f"Bearer {TOKEN}"}
    for lease in (await run.client.get("/v1/leases", headers=auth)).json()["data"]:
        await run.client.delete(f"/v1/leases/{lease['id']}", headers=auth)
    with anyio.fail_after(10):
        while not run.settled():  # noqa: ASYNC110 - the gateway's leases end in their own tasks
            await anyio.sleep(0.01)
    r = await run.client.post("/v1/leases", json={"model": "llm", "ttl_s": 1, "timeout": 10}, headers=auth)
    assert r.status_code == 200, r.text
    assert (await run.client.delete(f"/v1/leases/{r.json()['id']}", headers=auth)).status_code == 200
    with anyio.fail_after(10):
        while not run.settled():  # noqa: ASYNC110
            await anyio.sleep(0.01)
    ledger = run.orch.ledger()
    assert ledger.committed_bytes <= ledger.budget_bytes
    assert run.daemon.leases.leases() == [] and not any(run.orch.leases().values())


def test_fuzzed_requests_get_no_server_error_and_leave_the_daemon_whole(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        daemon={"lease_ttl_s": 0.5, "max_lease_ttl_s": 1, "request_timeout_s": 2, "max_body_bytes": 65536},
    )
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(running_daemon(config, token=TOKEN, body_timeout_s=5)) as run,
    ):

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(target=targets(), hdrs=headers(), body=bodies())
        def request(target: tuple[str, str], hdrs: dict[str, str], body: bytes | None) -> None:
            r = portal.call(one, run, *target, hdrs, body)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            check(r)

        seen: dict[int, int] = {}
        request()
        # The run reached past the bearer check and past parsing, into the handlers.
        assert sum(seen.values()) >= EXAMPLES and 200 in seen and 400 in seen and 401 in seen, seen
        portal.call(cleanup, run)
