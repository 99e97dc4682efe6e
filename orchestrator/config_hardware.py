"""The hardware section's cards: each card's sizes (``safe_max_vram_gb``, the budget the
orchestrator may use, and ``total_vram_gb``) and which cards there are (``hardware.gpus``: a
count of cards of the hardware's size, a list of indexes or of cards with their own sizes, or
``all``, every card NVML finds). Plain functions over the parser's shared checks
(``orchestrator.config_sections._Sections``: every error names the config file and the key);
``orchestrator.config``'s parser calls them before it reads the models, whose placement is
checked against these cards."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.config_sections import _Sections
from orchestrator.spec import CardSpec
from states.units import format_gib, gib_to_bytes

# Discovered cards (hardware.gpus: all) without a safe_max_vram_gb keep this much of each
# free for the driver and the desktop.
DISCOVERED_HEADROOM_BYTES = 512 * 2**20

GPU_KEYS = ("index", "gpu_name", "total_vram_gb", "safe_max_vram_gb")


def hardware_sizes(check: _Sections, hw: Mapping[str, Any], key: str) -> tuple[int, int]:
    """(budget, total) of one card: ``safe_max_vram_gb`` and ``total_vram_gb`` at ``key``."""
    if "safe_max_vram_gb" not in hw:
        raise check.err(
            f"{key}.safe_max_vram_gb",
            "missing budget",
            "set the most VRAM the orchestrator may use, e.g. 15.5 on a 16 GiB card",
        )
    budget = gib_to_bytes(check.number(hw["safe_max_vram_gb"], f"{key}.safe_max_vram_gb", strict=True))
    total = gib_to_bytes(
        check.number(hw.get("total_vram_gb", hw["safe_max_vram_gb"]), f"{key}.total_vram_gb", strict=True)
    )
    if budget > total:
        raise check.err(
            f"{key}.safe_max_vram_gb",
            f"{format_gib(budget)} is more than total_vram_gb ({format_gib(total)})",
            "keep safe_max_vram_gb at or below total_vram_gb",
        )
    return budget, total


def hardware_cards(check: _Sections, hw: Mapping[str, Any], device: str) -> tuple[CardSpec, ...] | None:
    """``hardware.gpus``: a count of cards of the hardware's size, a list (of indexes, or
    of mappings with each card's index, name and sizes), or ``all`` (every card NVML
    finds, at its own size). None when absent: the one card of the hardware section."""
    g = hw.get("gpus")
    if g is None:
        return None
    name = str(hw.get("gpu_name", "GPU"))
    if g == "all":
        return _discovered(check, hw, device)
    if isinstance(g, int) and not isinstance(g, bool):
        if g < 1:
            raise check.err("hardware.gpus", f"expected at least 1 card, got {g}", "e.g. gpus: 2")
        budget, total = hardware_sizes(check, hw, "hardware")
        return tuple(CardSpec(i, name, total, budget) for i in range(g))
    if not isinstance(g, list) or not g:
        raise check.err(
            "hardware.gpus",
            f"expected a count, a list of cards or `all`, got {g!r}",
            "e.g. gpus: 2, gpus: [0, 1], or gpus: [{index: 0, safe_max_vram_gb: 23}, ...]",
        )
    out: list[CardSpec] = []
    for pos, item in enumerate(g):
        key = f"hardware.gpus[{pos}]"
        if isinstance(item, Mapping):
            check.no_unknown(item, key, GPU_KEYS)
            sizes = {k: item.get(k, hw.get(k)) for k in ("safe_max_vram_gb", "total_vram_gb")}
            budget, total = hardware_sizes(check, {k: v for k, v in sizes.items() if v is not None}, key)
            idx = item.get("index", pos)
            card_name = str(item.get("gpu_name", name))
        else:
            idx, card_name = item, name
            budget, total = hardware_sizes(check, hw, "hardware")
        if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
            where = f"{key}.index" if isinstance(item, Mapping) else key
            raise check.err(where, f"expected a GPU index >= 0, got {idx!r}", "use 0 for the first GPU")
        if any(c.index == idx for c in out):
            raise check.err(
                "hardware.gpus",
                f"lists card {idx} twice: one card would be counted as two, and its memory twice",
                "list each physical card once (`nvidia-smi -L` lists them with their indexes)",
            )
        out.append(CardSpec(idx, card_name, total, budget))
    return tuple(out)


def _discovered(check: _Sections, hw: Mapping[str, Any], device: str) -> tuple[CardSpec, ...] | None:
    from orchestrator.device.nvml import discover_cards

    if device == "simulated":
        raise check.err(
            "hardware.gpus",
            "`all` discovers real cards, and hardware.device is simulated",
            "give a count (gpus: 2) or a list of cards with their sizes",
        )
    found = discover_cards()
    if not found:
        if device == "auto":
            return None  # no GPU: the hardware section's one (simulated) card, as auto does
        raise check.err("hardware.gpus", "`all` found no card through NVML", "list the cards by hand")
    cap = hw.get("safe_max_vram_gb")
    cap_bytes = gib_to_bytes(check.number(cap, "hardware.safe_max_vram_gb", strict=True)) if cap else None
    return tuple(
        CardSpec(i, n, t, min(t, cap_bytes) if cap_bytes else max(0, t - DISCOVERED_HEADROOM_BYTES))
        for i, n, t in found
    )
