"""What an orchestrator holds now, as plain data: ``status_report(orch)``.

The ``status`` command prints it as a table or as JSON; the daemon will serve the same dict.
It reads only: the device (its used bytes), the ledger (a frozen snapshot), the backends'
own measurements and the lease and wait counts. Bytes are ints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from states.units import format_gib

if TYPE_CHECKING:
    from orchestrator.runtime import Orchestrator


def status_report(orch: Orchestrator) -> dict[str, Any]:
    """The device, the budget, the state and every model's tier and bytes.

    ``measured_bytes`` is what the model's backend says it holds on the device now, or
    ``None`` when the backend cannot tell. ``foreign_bytes`` is the device's used memory
    that no model of ours accounts for (other processes).
    """
    config = orch.config
    ledger = orch.ledger()
    device = orch.device
    used = device.used_bytes()
    ours = orch.accounted_bytes()  # as the scheduler counts it; the rest of `used` is foreign
    leases = dict(orch.leases())
    waiting: dict[str, int] = {}
    for model, _priority, _waited in orch.waiting():
        waiting[model] = waiting.get(model, 0) + 1

    models = []
    for name, spec in config.models.items():
        tier = ledger.tier_of(name)
        if ledger.loading is not None and ledger.loading.model == name:
            tier_name = "loading"
        else:
            tier_name = tier.value
        backend = orch.backends.get(name)
        models.append(
            {
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
        )
    return {
        "config": config.source,
        "device": {
            "name": device.name,
            "source": device.source,
            "total_bytes": device.total_bytes,
            "used_bytes": used,
        },
        "budget_bytes": ledger.budget_bytes,
        "host_budget_bytes": ledger.host_budget_bytes,
        "committed_bytes": ledger.committed_bytes,
        "foreign_bytes": max(0, used - ours),
        "state": orch.state.name,
        "scheduling": config.mode.value,
        "models": models,
        "cache": cache_report(config),
    }


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
    """The report as the ``status`` command prints it: a header and an aligned table."""
    dev = report["device"]
    lines = [
        f"{report['config']}" + ("" if running else " (not running: the config's view; no daemon yet)"),
        f"device   {dev['name']} (numbers from: {dev['source']})",
        f"VRAM     total {format_gib(dev['total_bytes'])}, budget {format_gib(report['budget_bytes'])}, "
        f"used on the device {format_gib(dev['used_bytes'])} "
        f"(other processes {format_gib(report['foreign_bytes'])})",
        f"state    {report['state']}, committed {format_gib(report['committed_bytes'])} of the budget",
    ]
    cache = report.get("cache")
    if cache is not None:
        lines.append(
            f"cache    {cache['path']}: {len(cache['entries'])} entries, {format_gib(cache['used_bytes'])} "
            f"of {format_gib(cache['budget_bytes'])} (models marked cached load from it next)"
        )
    lines.append("")
    # Leases and waiters exist only while it runs; the config's view leaves them out.
    head = ("model", "kind", "class", "tier", "estimated", "learned", "measured", "leases", "waiting", "")
    keep = [i for i in range(len(head)) if running or head[i] not in ("leases", "waiting")]
    rows = [head]
    for m in report["models"]:
        measured = m["measured_bytes"]
        rows.append(
            (
                m["name"],
                m["kind"],
                m["class"],
                m["tier"],
                format_gib(m["estimated_bytes"]),
                "-" if m["learned_bytes"] is None else format_gib(m["learned_bytes"]),
                "-" if measured is None else format_gib(measured),
                str(m["leases"]),
                str(m["waiting"]),
                " ".join(
                    w for w, on in (("default", m["default"]), ("cached", m.get("cached", False))) if on
                ),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    right = {4, 5, 6, 7, 8}  # numbers align right
    for r in rows:
        cells = [r[i].rjust(widths[i]) if i in right else r[i].ljust(widths[i]) for i in keep]
        lines.append("  " + "  ".join(cells).rstrip())
    for m in report["models"]:
        srv = m["server"]
        if srv and srv["log"]:
            lines.append(f"  {m['name']}: server pid {srv['pid']} at {srv['url']}, log {srv['log']}")
    return "\n".join(lines)
