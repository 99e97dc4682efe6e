"""The demo's pieces a new user meets: the speech level, the progress line, its arguments and
an LLM behind a real server."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

import orchestrator.config
from orchestrator.config import parse_config
from orchestrator.demo import SPEECH_PEAK_DBFS, Progress, run_demo, speech_wav
from orchestrator.events import Event
from orchestrator.progress import StatusLine, Ticker
from orchestrator.runtime import Orchestrator
from states.units import GIB

pytestmark = pytest.mark.anyio
FAKE_SERVER = str(Path(__file__).resolve().parent / "fixtures" / "fake_openai_server.py")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pcm_of(wav_bytes: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(wav_bytes)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2"), w.getframerate()


# -- the speech level ----------------------------------------------------------------------------


def test_loud_noise_is_brought_down_to_the_peak_level_and_never_clips() -> None:
    """The tiny TTS model's random weights give noise past full scale (3% clipped at first)."""
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 0.8, 16_000).astype(np.float32)  # RMS 26,000 of 32,767 once scaled
    assert np.mean(np.abs(noise) >= 1.0) > 0.01  # the input would clip
    pcm, rate = pcm_of(speech_wav(noise, 16_000))
    assert rate == 16_000 and pcm.size == noise.size
    limit = 10 ** (SPEECH_PEAK_DBFS / 20) * 32767  # -12 dBFS: 8230.5
    assert int(np.max(np.abs(pcm.astype(np.int32)))) == round(limit) == 8231
    assert not np.any(np.abs(pcm.astype(np.int32)) >= 32767)
    # The waveform is the model's, only quieter: same shape, scaled.
    scaled = noise.astype(np.float64) / np.max(np.abs(noise)) * limit
    assert np.max(np.abs(pcm - scaled)) <= 0.5 + 1e-6  # rounding only


def test_quiet_speech_is_left_as_it_is() -> None:
    """A real model's speech below the level is not boosted."""
    t = np.arange(8000) / 8000
    tone = (0.05 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    pcm, _ = pcm_of(speech_wav(tone, 8000))
    assert np.array_equal(pcm, np.round(tone.astype(np.float64) * 32767).astype("<i2"))


def test_silence_and_nan_give_a_valid_file() -> None:
    pcm, _ = pcm_of(speech_wav(np.array([0.0, np.nan, 0.0], dtype=np.float32), 16_000))
    assert pcm.tolist() == [0, 0, 0]


# -- the progress line ---------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_status_line_is_quiet_when_output_is_not_a_terminal() -> None:
    out = io.StringIO()
    line = StatusLine(out)
    with Ticker(line) as ticker:
        ticker.step("building tiny-sdxl (1 of 2, first use only)")
        line.print("a line that stays")
    assert out.getvalue() == "a line that stays\n"


def test_the_status_line_on_a_terminal_is_rewritten_then_cleared() -> None:
    out = Terminal()
    line = StatusLine(out)
    ticker = Ticker(line)
    ticker.step("building tiny-sdxl (1 of 2, first use only)")
    shown = out.getvalue()
    assert shown.startswith("\r  building tiny-sdxl (1 of 2, first use only) ... 0.") and shown.endswith(" s")
    line.print("built")  # a lasting line first clears the status line
    after = out.getvalue()[len(shown) :]
    assert after == "\r" + " " * (len(shown) - 1) + "\rbuilt\n"
    ticker.step("x")
    ticker.done()
    assert out.getvalue().endswith("\r" + " " * len("  x ... 0.0 s") + "\r")


def test_a_slow_switch_shows_its_elapsed_time_on_a_terminal_only() -> None:
    """Progress starts the ticker at begin_switch (shown once it has run SLOW_SWITCH_S) and
    stops it at finish_switch, before the lasting line."""
    begin = Event(1.0, "transition", "sdxl-base", "begin_switch", "LLM_ACTIVE", "SWITCHING", 0, 10 * GIB)
    finish = Event(
        2.0, "transition", "sdxl-base", "finish_switch", "SWITCHING", "SDXL_ACTIVE", 0, 10 * GIB, 1.0
    )
    for stream, expect_status in ((Terminal(), True), (io.StringIO(), False)):
        line = StatusLine(stream)
        ticker = Ticker(line)
        progress = Progress(None, line, 1.0, ticker)  # type: ignore[arg-type]
        progress(begin)
        assert "\r" not in stream.getvalue()  # not yet: under a second
        ticker._since -= 5.0  # as if the load had run for five seconds
        ticker._render()
        assert ("\r  loading sdxl-base ... 5." in stream.getvalue()) is expect_status
        progress(finish)
        assert stream.getvalue().endswith(
            "now SDXL_ACTIVE (10.00 GiB committed; the switch takes 1.0 s at real speed)\n"
        )


async def test_a_demo_run_writes_no_carriage_return_to_a_pipe(tmp_path: Path) -> None:
    config = dataclasses.replace(orchestrator.config.load_config(None), time_scale=0.001)
    out = io.StringIO()
    await run_demo(Orchestrator(config), agents=2, out_dir=tmp_path, stream=out)
    assert "\r" not in out.getvalue()


async def test_no_agents_is_refused_before_any_folder_is_made(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="agents must be at least 1, got 0"):
        await run_demo(Orchestrator(orchestrator.config.load_config(None)), agents=0, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


# -- an LLM behind a real server -----------------------------------------------------------------


async def test_the_llm_steps_ask_a_server_model(tmp_path: Path) -> None:
    """With a config whose LLM is an OpenAI-compatible server, the demo sends it the prompts."""
    backend = {
        "type": "server",
        "command": [
            sys.executable,
            FAKE_SERVER,
            "--port",
            "{port}",
            "--host",
            "{host}",
            "--model",
            "{model}",
        ],
        "log_dir": str(tmp_path / "logs"),
        "start_timeout_s": 20,
        "stop_grace_s": 1,
    }
    text = f"""\
hardware: {{device: simulated, total_vram_gb: 16.0, safe_max_vram_gb: 15.5}}
simulation: {{time_scale: 0.001}}
monitor: {{sample_hz: 0}}
models:
  chat: {{kind: llm, vram_gb: 11.5, backend: {json.dumps(backend)}}}
  sdxl-base: {{kind: sdxl, vram_gb: 10.5}}
  voice: {{kind: tts, vram_gb: 3.5}}
"""
    out = io.StringIO()
    summary = await run_demo(
        Orchestrator(parse_config(text, "<demo server test>")), agents=1, out_dir=tmp_path / "o", stream=out
    )
    assert summary["leases"] == 4
    transcript = (tmp_path / "o" / "transcripts.txt").read_text()
    assert "  plan [chat] echo: Write an image prompt for: Luca running on the beach at sunset" in transcript
    assert "review [chat] echo: Evaluate the quality of: " in transcript
    assert "random weights" not in out.getvalue()  # no tiny models here, no noise note


# -- several simulated cards (--gpus N) ----------------------------------------------------------


def test_with_cards_makes_n_cards_of_the_configs_size() -> None:
    from orchestrator.demo_setup import with_cards

    config = orchestrator.config.load_config(None)
    two = with_cards(config, 3)
    assert [(c.index, c.total_bytes, c.budget_bytes) for c in two.cards] == [
        (i, config.total_bytes, config.budget_bytes) for i in range(3)
    ]
    assert two.budget_bytes == 3 * config.budget_bytes and two.models.keys() == config.models.keys()
    assert with_cards(config, 1) is config
    from orchestrator.errors import OrchestratorError

    with pytest.raises(OrchestratorError, match="already lists 3 cards"):
        with_cards(two, 2)


async def test_the_summary_has_a_line_per_card(tmp_path: Path) -> None:
    from orchestrator.demo_setup import with_cards

    config = with_cards(dataclasses.replace(orchestrator.config.load_config(None), time_scale=0.001), 2)
    out = io.StringIO()
    summary = await run_demo(Orchestrator(config), agents=2, out_dir=tmp_path, stream=out)
    assert [c["index"] for c in summary["cards"]] == [0, 1]
    text = out.getvalue()
    # Each card's budget holds on its own: no line sets a peak against the machine's sum.
    assert "peak VRAM per card" in text and "of the 31.00 GiB budget" not in text
    for c in summary["cards"]:
        assert f"cuda:{c['index']}             {c['peak_vram_bytes'] / GIB:.2f} GiB of its 15.50 GiB" in text
