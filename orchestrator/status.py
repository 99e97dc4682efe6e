"""What an orchestrator holds now, as plain data: ``status_report(orch)``.

The ``status`` command prints it as a table or as JSON; the daemon serves the same dict.
It reads only: the device (its used bytes), the ledger (a frozen snapshot), the backends'
own measurements and the lease and wait counts. Bytes are ints.

On a machine with several cards the report's top-level figures are the machine's totals, and
``cards`` lists each card (index, name, total, budget, committed, foreign, residents, state);
each model says which cards hold it (``gpus``) and which it may use. With one card the report
is what it always was (no ``cards``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from states.units import format_gib

if TYPE_CHECKING:
    from orchestrator.runtime import Orchestrator
    from states.cards import Card
    from states.ledger import Ledger


def status_report(orch: Orchestrator) -> dict[str, Any]:
    """The device, the budget, the state and every model's tier and bytes.

    ``measured_bytes`` is what the model's backend says it holds on the device now, or
    ``None`` when the backend cannot tell. ``foreign_bytes`` is the device's used memory
    that no model of ours accounts for (other processes).
    """
    config = orch.config
    ledger = orch.ledger()
    cards = orch.cards()
    several = len(cards) > 1
    device = orch.device
    if several:
        per_card = [_card_report(orch, card, led) for card, led in cards]
        used = sum(c["used_bytes"] for c in per_card)
        foreign = sum(c["foreign_bytes"] for c in per_card)
    else:
        used = device.used_bytes()
        ours = orch.accounted_bytes()  # as the scheduler counts it; the rest of `used` is foreign
        foreign = max(0, used - ours)
    leases = dict(orch.leases())
    waiting: dict[str, int] = {}
    for waiter, _priority, _waited in orch.waiting():
        waiting[waiter] = waiting.get(waiter, 0) + 1

    models = []
    for name, spec in config.models.items():
        tier = ledger.tier_of(name)
        if any(led.loading is not None and led.loading.model == name for _card, led in cards):
            tier_name = "loading"
        else:
            tier_name = tier.value
        backend = orch.backends.get(name)
        model: dict[str, Any] = {
            "name": name,
            "kind": spec.kind,
            "class": "heavy" if spec.kind in config.exclusive_kinds else "light",
            "default": config.defaults.get(spec.kind) == name,
            "tier": tier_name,
            "estimated_bytes": spec.vram_bytes,
            "learned_bytes": (fp.high_water_bytes if (fp := orch.footprints.get(name)) else None),
            "planned_bytes": orch.estimate(name).estimated_vram_bytes,
            "measured_bytes": backend.measured_bytes() if backend is not None else None,
            "server": (
                {"pid": backend.pid, "url": backend.url, "log": str(backend.log_path or "")}
                if backend is not None and backend.served_model is not None
                else None
            ),
            "host_bytes": spec.host_bytes if spec.offload else None,
            # the next cold load comes from the packed disk cache (not the source)
            "cached": bool(backend is not None and backend.cached),
            "confidence": spec.confidence,
            "backend": spec.backend,
            "leases": leases.get(name, 0),
            "waiting": waiting.get(name, 0),
        }
        if several:
            model["gpus"] = list(cards.gpus_of(name))  # the cards whose GPU holds it (or loads it)
            model["allowed_gpus"] = list(spec.gpus) if spec.gpus is not None else list(cards.indexes)
            model["tensor_parallel"] = spec.tensor_parallel
            model["card_bytes"] = spec.card_bytes
        models.append(model)
    report: dict[str, Any] = {
        "config": config.source,
        "device": {
            "name": device.name if not several else f"{len(cards)} cards",
            "source": device.source,
            "total_bytes": device.total_bytes
            if not several
            else sum(d.total_bytes for d in orch.devices.values()),
            "used_bytes": used,
        },
        "budget_bytes": ledger.budget_bytes,
        "host_budget_bytes": ledger.host_budget_bytes,
        "committed_bytes": ledger.committed_bytes,
        "foreign_bytes": foreign,
        "state": orch.state.name if not several else _machine_state(orch),
        "scheduling": config.mode.value,
        "models": models,
        "cache": cache_report(config),
    }
    if several:
        report["cards"] = per_card
    return report


def _card_report(orch: Orchestrator, card: Card, led: Ledger) -> dict[str, Any]:
    """One card of several: its device's numbers, its own ledger and its state."""
    device = orch.devices[card.index]
    used = device.used_bytes()
    ours = orch.accounted_bytes(card.index)  # as the scheduler counts it
    return {
        "index": card.index,
        "name": device.name,
        "label": card.label if card.name else f"cuda:{card.index} ({device.name})",
        "source": device.source,
        "total_bytes": device.total_bytes,
        "used_bytes": used,
        "budget_bytes": led.budget_bytes,
        "committed_bytes": led.committed_bytes,
        "foreign_bytes": max(0, used - ours),
        "state": orch.states()[card.index].name,
        "residents": [r.model for r in led.gpu_residents],
        "loading": led.loading.model if led.loading is not None else None,
        "host_copies": [r.model for r in led.host_residents],
    }


def _machine_state(orch: Orchestrator) -> str:
    """The machine's state in one word: SWITCHING while any card switches, else the one state
    all cards share, else MIXED (each card's is in ``cards``)."""
    states = {s.name for s in orch.states().values()}
    if "SWITCHING" in states:
        return "SWITCHING"
    return states.pop() if len(states) == 1 else "MIXED"


def cache_report(config: Any) -> dict[str, Any] | None:
    """The packed disk cache: its folder, budget, what it holds (None without a cache)."""
    if config.cache is None:
        return None
    from pathlib import Path

    from orchestrator.backends.diskcache import DiskCache

    cache = DiskCache(Path(config.cache.path), config.cache.budget_bytes)
    entries = cache.entries()
    return {
        "path": str(cache.root),
        "budget_bytes": cache.budget_bytes,
        "used_bytes": sum(e.data_bytes for e in entries),
        "entries": [
            {
                "key": e.key,
                "model": e.model,
                "bytes": e.data_bytes,
                "last_used_s": e.last_used_s,
                "fresh": e.fresh,
            }
            for e in entries
        ],
    }


def format_status(report: dict[str, Any], *, running: bool = False) -> str:
    """The report as the ``status`` command prints it: a header and an aligned table (with
    several cards, a table of the cards too, and the card(s) each model is on)."""
    dev = report["device"]
    cards = report.get("cards")
    lines = [
        f"{report['config']}" + ("" if running else " (not running: the config's view; no daemon yet)"),
        f"device   {dev['name']} (numbers from: {dev['source']})",
        f"VRAM     total {format_gib(dev['total_bytes'])}, budget {format_gib(report['budget_bytes'])}, "
        f"used on the device{'s' if cards else ''} {format_gib(dev['used_bytes'])} "
        f"(other processes {format_gib(report['foreign_bytes'])})",
        f"state    {report['state']}, committed {format_gib(report['committed_bytes'])} of the budget"
        + (" (every card's together)" if cards else ""),
    ]
    cache = report.get("cache")
    if cache is not None:
        lines.append(
            f"cache    {cache['path']}: {len(cache['entries'])} entries, {format_gib(cache['used_bytes'])} "
            f"of {format_gib(cache['budget_bytes'])} (models marked cached load from it next)"
        )
    lines.append("")
    if cards:
        card_rows = [("card", "name", "total", "budget", "committed", "foreign", "state", "residents")]
        for c in cards:
            on = list(c["residents"]) + ([f"{c['loading']} (loading)"] if c.get("loading") else [])
            card_rows.append(
                (
                    f"cuda:{c['index']}",
                    c["name"],
                    format_gib(c["total_bytes"]),
                    format_gib(c["budget_bytes"]),
                    format_gib(c["committed_bytes"]),
                    format_gib(c["foreign_bytes"]),
                    c["state"],
                    ", ".join(on) or "-",
                )
            )
        lines += _aligned(card_rows, right={2, 3, 4, 5})
        lines.append("")
    # Leases and waiters exist only while it runs; the config's view leaves them out.
    head = (
        "model",
        "kind",
        "class",
        "tier",
        "gpu",
        "estimated",
        "learned",
        "measured",
        "leases",
        "waiting",
        "",
    )
    hidden = {"leases", "waiting"} if not running else set()
    if not cards:
        hidden.add("gpu")
    keep = [i for i in range(len(head)) if head[i] not in hidden]
    rows = [head]
    for m in report["models"]:
        measured = m["measured_bytes"]
        rows.append(
            (
                m["name"],
                m["kind"],
                m["class"],
                m["tier"],
                "+".join(str(g) for g in m.get("gpus", ())) or "-",
                format_gib(m["estimated_bytes"]),
                "-" if m["learned_bytes"] is None else format_gib(m["learned_bytes"]),
                "-" if measured is None else format_gib(measured),
                str(m["leases"]),
                str(m["waiting"]),
                ", ".join(
                    x
                    for x in (
                        " ".join(
                            w
                            for w, on in (("default", m["default"]), ("cached", m.get("cached", False)))
                            if on
                        ),
                        ", ".join(_placement_notes(m, cards)),
                    )
                    if x
                ),
            )
        )
    right = {5, 6, 7, 8, 9}  # numbers align right
    lines += _aligned(
        [tuple(r[i] for i in keep) for r in rows], right={keep.index(i) for i in right if i in keep}
    )
    for m in report["models"]:
        srv = m["server"]
        if srv and srv["log"]:
            lines.append(f"  {m['name']}: server pid {srv['pid']} at {srv['url']}, log {srv['log']}")
    return "\n".join(lines)


def _placement_notes(m: dict[str, Any], cards: list[dict[str, Any]] | None) -> list[str]:
    """With several cards: "spans 2 cards" and "only cuda:1" where the config says so."""
    if not cards:
        return []
    notes = []
    if m.get("tensor_parallel", 1) > 1:
        notes.append(f"spans {m['tensor_parallel']} cards")
    allowed = m.get("allowed_gpus")
    if allowed is not None and len(allowed) < len(cards):
        notes.append("only " + ", ".join(f"cuda:{g}" for g in allowed))
    return notes


def _aligned(rows: Sequence[tuple[str, ...]], *, right: set[int]) -> list[str]:
    """Rows as aligned lines, indented by two; columns in ``right`` align right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
        out.append("  " + "  ".join(cells).rstrip())
    return out
