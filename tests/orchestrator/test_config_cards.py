"""hardware.gpus and models.<name>.gpus / tensor_parallel: several cards in the config."""

from __future__ import annotations

import pytest

from orchestrator.config import load_config, parse_config
from orchestrator.errors import ConfigError
from orchestrator.spec import TP_OVERHEAD_BYTES
from states.units import GIB

TWO = (
    "hardware: {device: simulated, gpus: ["
    "{index: 0, total_vram_gb: 24, safe_max_vram_gb: 23, gpu_name: big}, "
    "{index: 1, total_vram_gb: 16, safe_max_vram_gb: 15}]}\n"
)


def cfg(hardware: str, models: str = "models: {a: {kind: llm, vram_gb: 10}}") -> object:
    return parse_config(hardware + models, source="<test>")


def test_todays_single_card_config_has_one_card() -> None:
    c = load_config(None)
    assert len(c.cards) == 1 and c.gpus == ()
    (card,) = c.cards
    assert (card.index, card.budget_bytes, card.total_bytes) == (
        c.device_index,
        c.budget_bytes,
        c.total_bytes,
    )


def test_a_list_of_cards_with_their_own_sizes() -> None:
    c = parse_config(TWO + "models: {a: {kind: llm, vram_gb: 20}, b: {kind: sdxl, vram_gb: 10, gpus: [1]}}")
    assert [(x.index, x.name, x.budget_bytes) for x in c.cards] == [
        (0, "big", 23 * GIB),
        (1, "GPU", 15 * GIB),
    ]
    assert c.budget_bytes == 38 * GIB and c.total_bytes == 40 * GIB
    assert c.models["b"].gpus == (1,) and c.models["a"].gpus is None


def test_a_count_of_cards_of_the_hardwares_size() -> None:
    c = parse_config(
        "hardware: {device: simulated, safe_max_vram_gb: 15, gpus: 3}\nmodels: {a: {kind: llm, vram_gb: 9}}"
    )
    assert [x.index for x in c.cards] == [0, 1, 2] and all(x.budget_bytes == 15 * GIB for x in c.cards)


def test_a_list_of_indexes_takes_the_hardwares_size() -> None:
    c = parse_config(
        "hardware: {device: simulated, safe_max_vram_gb: 15, gpus: [2, 5]}\n"
        "models: {a: {kind: llm, vram_gb: 9}}"
    )
    assert [x.index for x in c.cards] == [2, 5] and c.device_index == 2


@pytest.mark.parametrize(
    ("hardware", "models", "key", "says"),
    [
        (
            "hardware: {device: simulated, safe_max_vram_gb: 15, gpus: [0, 0]}\n",
            "",
            "hardware.gpus",
            "lists card 0 twice",
        ),
        (
            "hardware: {device: simulated, safe_max_vram_gb: 15, gpus: 0}\n",
            "",
            "hardware.gpus",
            "at least 1 card",
        ),
        (
            "hardware: {device: simulated, safe_max_vram_gb: 15, gpus: yes}\n",
            "",
            "hardware.gpus",
            "a count, a list",
        ),
        (
            "hardware: {device: simulated, gpus: [{index: 0}]}\n",
            "",
            "hardware.gpus[0].safe_max_vram_gb",
            "missing",
        ),
        (
            "hardware: {device: simulated, gpus: [{index: -1, safe_max_vram_gb: 8}]}\n",
            "",
            "hardware.gpus[0].index",
            ">= 0",
        ),
        (
            "hardware: {device: simulated, gpus: [{slot: 0, safe_max_vram_gb: 8}]}\n",
            "",
            "hardware.gpus[0].slot",
            "unknown key",
        ),
        (
            "hardware: {device: simulated, safe_max_vram_gb: 15, gpus: all}\n",
            "",
            "hardware.gpus",
            "discovers real cards",
        ),
        (TWO, "models: {a: {kind: llm, vram_gb: 9, gpus: [2]}}", "models.a.gpus", "names [2]"),
        (TWO, "models: {a: {kind: llm, vram_gb: 9, gpus: [1, 1]}}", "models.a.gpus", "lists a card twice"),
        (TWO, "models: {a: {kind: llm, vram_gb: 9, gpus: 1}}", "models.a.gpus", "list of card indexes"),
        (TWO, "models: {a: {kind: llm, vram_gb: 20, gpus: [1]}}", "models.a.vram_gb", "every card's budget"),
        (
            TWO,
            "models: {a: {kind: llm, vram_gb: 9, tensor_parallel: 3}}",
            "models.a.tensor_parallel",
            "spans 3",
        ),
        (
            TWO,
            "models: {a: {kind: llm, vram_gb: 40, tensor_parallel: 2}}",
            "models.a.tensor_parallel",
            "fits 1 of the 2 cards",
        ),
    ],
)
def test_bad_card_settings_name_the_key_and_the_fix(hardware: str, models: str, key: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(hardware + (models or "models: {a: {kind: llm, vram_gb: 2}}"), source="<test>")
    assert err.value.key == key, err.value
    assert says in str(err.value)


def test_a_spanning_model_reserves_its_share_and_the_overhead_on_each_card() -> None:
    c = parse_config(TWO + "models: {big: {kind: llm, vram_gb: 26, tensor_parallel: 2}}")
    spec = c.models["big"]
    assert spec.tensor_parallel == 2
    assert spec.card_bytes == 13 * GIB + TP_OVERHEAD_BYTES


def test_one_card_too_small_for_a_model_is_still_the_budget_message() -> None:
    with pytest.raises(ConfigError, match="larger than the whole budget"):
        cfg("hardware: {device: simulated, safe_max_vram_gb: 8}\n", "models: {a: {kind: llm, vram_gb: 9}}")
