"""``status_report`` and ``format_status`` on a machine with several cards (one card: see
tests/test_cli.py, whose single-card output must not change)."""

from __future__ import annotations

import textwrap

import pytest

from orchestrator.config import Config, parse_config
from orchestrator.runtime import Orchestrator
from orchestrator.status import format_status, status_report
from states.units import gib_to_bytes

pytestmark = pytest.mark.anyio

TWO_CARDS = textwrap.dedent(
    """\
    hardware:
      device: simulated
      gpus:
        - {index: 0, gpu_name: Card A, total_vram_gb: 24, safe_max_vram_gb: 23}
        - {index: 1, gpu_name: Card B, total_vram_gb: 16, safe_max_vram_gb: 15}
    simulation: {time_scale: 0.001}
    switching: {max_wait_s: 5, load_timeout_s: 0.5, unload_timeout_s: 0.2, fairness_s: 0.05}
    models:
      qwen-14b: {kind: llm, vram_gb: 11.5, gpus: [0]}
      big-llm: {kind: llm, vram_gb: 26, tensor_parallel: 2}
      sdxl-base: {kind: sdxl, vram_gb: 10.5, gpus: [1]}
      tts: {kind: tts, vram_gb: 3.5}
    defaults: {llm: qwen-14b}
    """
)


def two_cards() -> Config:
    return parse_config(TWO_CARDS, source="<two cards>")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_the_config_view_lists_each_card() -> None:
    report = status_report(Orchestrator(two_cards()))
    assert [(c["index"], c["name"], c["budget_bytes"], c["total_bytes"]) for c in report["cards"]] == [
        (0, "Card A", gib_to_bytes(23), gib_to_bytes(24)),
        (1, "Card B", gib_to_bytes(15), gib_to_bytes(16)),
    ]
    assert all(c["state"] == "IDLE" and c["residents"] == [] for c in report["cards"])
    assert report["budget_bytes"] == gib_to_bytes(38)
    assert report["device"]["total_bytes"] == gib_to_bytes(40)
    models = {m["name"]: m for m in report["models"]}
    assert models["sdxl-base"]["allowed_gpus"] == [1]
    assert models["big-llm"]["allowed_gpus"] == [0, 1] and models["big-llm"]["tensor_parallel"] == 2
    text = format_status(report)
    lines = text.splitlines()
    head = next(line for line in lines if line.split()[:2] == ["card", "name"])
    assert head.split() == ["card", "name", "total", "budget", "committed", "foreign", "state", "residents"]
    row1 = next(line for line in lines if line.strip().startswith("cuda:1"))
    assert row1.split()[:6] == ["cuda:1", "Card", "B", "16.00", "GiB", "15.00"]
    sdxl = next(line for line in lines if line.strip().startswith("sdxl-base"))
    assert sdxl.rstrip().endswith("default, only cuda:1")
    big = next(line for line in lines if line.strip().startswith("big-llm"))
    assert big.rstrip().endswith("spans 2 cards")


async def test_a_running_machine_shows_what_each_card_holds() -> None:
    orch = Orchestrator(two_cards())
    async with orch:
        # Two heavy models on two cards at once: the LLM on card 0, SDXL on card 1.
        async with orch.acquire("qwen-14b"), orch.acquire("sdxl-base"):
            report = status_report(orch)
            cards = {c["index"]: c for c in report["cards"]}
            assert cards[0]["residents"] == ["qwen-14b"] and cards[0]["state"] == "LLM_ACTIVE"
            assert cards[1]["residents"] == ["sdxl-base"] and cards[1]["state"] == "SDXL_ACTIVE"
            assert cards[0]["committed_bytes"] == gib_to_bytes(11.5)
            assert cards[1]["committed_bytes"] == gib_to_bytes(10.5)
            assert report["committed_bytes"] == gib_to_bytes(22)
            assert report["state"] == "MIXED"
            models = {m["name"]: m for m in report["models"]}
            assert models["qwen-14b"]["gpus"] == [0] and models["sdxl-base"]["gpus"] == [1]
            assert models["qwen-14b"]["tier"] == "gpu" and models["big-llm"]["gpus"] == []
            text = format_status(report, running=True)
            row0 = next(line for line in text.splitlines() if line.strip().startswith("cuda:0"))
            assert row0.split()[-2:] == ["LLM_ACTIVE", "qwen-14b"]
            qwen = next(line for line in text.splitlines() if line.strip().startswith("qwen-14b"))
            assert qwen.split()[1:5] == ["llm", "heavy", "gpu", "0"]
        # The spanning model takes both cards: the others leave them.
        async with orch.acquire("big-llm"):
            report = status_report(orch)
            assert [c["residents"] for c in report["cards"]] == [["big-llm"], ["big-llm"]]
            assert report["state"] == "LLM_ACTIVE"
            (big,) = [m for m in report["models"] if m["name"] == "big-llm"]
            assert big["gpus"] == [0, 1]
            text = format_status(report, running=True)
            line = next(x for x in text.splitlines() if x.strip().startswith("big-llm"))
            assert line.split()[4] == "0+1"


def test_one_card_has_no_cards_section() -> None:
    report = status_report(Orchestrator.from_config(None))
    assert "cards" not in report
    assert all("gpus" not in m for m in report["models"])
    assert "card" not in format_status(report).split()
