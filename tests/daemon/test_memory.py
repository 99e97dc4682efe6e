"""A speech request at its model's configured limit stays within the model's reservation; one
over the limit is refused before anything runs or loads.

The tiny VITS model runs on the CPU here, so its working memory is this process's: the growth
of the resident set's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``)
while the request runs is what the request cost. Spoken whole, 600 characters took about
350 MiB, more than twice the 150 MiB reservation (VITS's alignment is text length x frames);
spoken in pieces of at most 200 characters, as the daemon does, they stay well within it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.daemon.conftest import write_config
from tests.daemon.inproc import running_daemon

pytestmark = pytest.mark.anyio
pytest.importorskip("torch")
pytest.importorskip("transformers")

LIMIT_CHARS = 600
RESERVATION_GIB = 0.15
TEXT = ("The quick brown fox jumps over the lazy dog. " * 20)[:LIMIT_CHARS]


def resident() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_high_water_mark() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset VmHWM to the current resident set
    except OSError as exc:
        pytest.skip(f"cannot reset this process's peak resident memory ({exc}); Linux only")


def tts_config(tmp_path: Path) -> Path:
    from orchestrator.tiny_models import build

    tiny = build(tmp_path / "models", ("tiny-tts",))
    models = {
        "qwen-14b": {"kind": "llm", "vram_gb": 11.5},
        "tts-small": {
            "kind": "tts",
            "vram_gb": RESERVATION_GIB,
            "backend": {"type": "tts", "path": str(tiny["tiny-tts"])},
            "limits": {"max_input_chars": LIMIT_CHARS},
        },
    }
    path = write_config(tmp_path, models=models, load_timeout_s=120)
    cfg = json.loads(path.read_text())
    del cfg["models"]["tts-small"]["backend"]["log_dir"]  # (a server's key, added for all)
    path.write_text(json.dumps(cfg))
    return path


async def test_speech_at_its_limit_stays_within_the_reservation(tmp_path: Path) -> None:
    async with running_daemon(tts_config(tmp_path)) as run:
        c = run.client
        reservation_bytes = run.orch.config.models["tts-small"].vram_bytes
        # Over the limit: refused before the model loads, and nothing runs.
        r = await c.post("/v1/audio/speech", json={"input": TEXT + "!"})
        assert r.status_code == 400, r.text
        assert "models.tts-small.limits.max_input_chars" in r.json()["error"]["message"]
        assert run.orch.statistics().loads == 0 and run.orch.ledger().committed_bytes == 0
        r = await c.post("/v1/audio/speech", json={"input": "Warm up."})  # loads the model
        assert r.status_code == 200, r.text
        reset_high_water_mark()
        before = resident()["VmRSS"]
        r = await c.post("/v1/audio/speech", json={"input": TEXT})
        grew_bytes = resident()["VmHWM"] - before
        assert r.status_code == 200, r.text
        assert r.content[:4] == b"RIFF" and len(r.content) > 100_000  # the whole text was spoken
        assert 0 < grew_bytes <= reservation_bytes, (grew_bytes, reservation_bytes)
        # The ledger held the reservation for it, and the device agrees.
        assert run.orch.ledger().on_gpu("tts-small")
        assert run.device.held_by("tts-small") == reservation_bytes
