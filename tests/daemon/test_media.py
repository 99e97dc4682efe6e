"""The daemon's image and speech endpoints with the real tiny SDXL and TTS models (on the CPU,
standing in for the full-size ones on the simulated card)."""

from __future__ import annotations

import base64
import io
import wave
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")
PIL = pytest.importorskip("PIL.Image")


def test_images_and_speech_from_the_tiny_models(tmp_path: Path, start_daemon: Any) -> None:
    from orchestrator.tiny_models import build

    tiny = build(tmp_path / "models", ("tiny-sdxl", "tiny-tts"))
    config = tmp_path / "media.yaml"
    config.write_text(
        f"""\
hardware: {{device: simulated, total_vram_gb: 16.0, safe_max_vram_gb: 15.5}}
switching: {{heavy_models: [llm, sdxl], light_models: [tts], host_ram_budget_gb: 12,
             load_timeout_s: 120}}
simulation: {{time_scale: 0.01}}
models:
  qwen-14b: {{kind: llm, vram_gb: 11.5}}
  sdxl-base:
    kind: sdxl
    vram_gb: 10.5
    offload: true
    host_gb: 6.5
    backend: {{type: diffusers, path: "{tiny["tiny-sdxl"]}", steps: 2}}
  tts-small:
    kind: tts
    vram_gb: 3.5
    backend: {{type: tts, path: "{tiny["tiny-tts"]}"}}
"""
    )
    d = start_daemon(config)
    with d.client(timeout=120) as c:
        r = c.post("/v1/images/generations", json={"prompt": "a fox", "size": "64x64", "n": 2, "seed": 3})
        assert r.status_code == 200, r.text
        images = [base64.b64decode(item["b64_json"]) for item in r.json()["data"]]
        assert len(images) == 2
        for png in images:
            img = PIL.open(io.BytesIO(png))
            img.load()
            assert img.format == "PNG" and img.size == (64, 64)
        r = c.post("/v1/audio/speech", json={"model": "tts", "input": "hello there"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "audio/wav"
        with wave.open(io.BytesIO(r.content)) as w:
            assert w.getframerate() == 16000 and w.getnframes() > 1000
        # an LLM lease pushes SDXL to the host tier; the next image is a restore, not a reload
        lease = c.post("/v1/leases", json={"model": "qwen-14b", "timeout": 30})
        assert lease.status_code == 200, lease.text
        assert c.delete(f"/v1/leases/{lease.json()['id']}").status_code == 200
        tiers = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert "host" in str(tiers["sdxl-base"]).lower()
        r = c.post("/v1/images/generations", json={"prompt": "a fox", "size": "64x64", "seed": 3})
        assert r.status_code == 200, r.text
        assert base64.b64decode(r.json()["data"][0]["b64_json"]) == images[0]  # same weights back
        r = c.post("/v1/images/generations", json={"prompt": "a fox", "size": "60x64"})
        assert r.status_code == 400 and "64" in r.text
        stats = c.get("/v1/status").json()
        assert "sdxl-base" in str(stats)
