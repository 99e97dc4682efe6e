"""A VRAM timeline chart from the event log: who held the GPU, when, and the switches.

The event log (``Event`` objects, or the ``events.jsonl`` that the demo and
``observability.events_path`` write) says when each model was loaded and evicted, and every
switch's committed bytes. From it, ``reconstruct()`` rebuilds each model's residency:

- a model is resident from its ``load`` event to its ``evict`` event that starts with
  ``gpu ->`` (``gpu -> host ...``, ``gpu -> disk ...``); a ``host -> disk`` eviction only
  drops a host copy and changes nothing on the GPU;
- before that, from ``duration_s`` before its ``load`` event, the model was loading: its
  bytes were already committed (drawn hatched);
- the events carry no per-model bytes, so a model's bytes come from the switch that loaded
  it: its ``finish_switch`` transition's ``bytes_after`` (what is committed once it is in)
  less the bytes of the other models then resident;
- a log appended to by several runs (``observability.events_path``) is drawn run after run:
  each run's clock starts at zero, so a time that goes backwards begins the next run;
- switch spans run from ``begin_switch`` to ``finish_switch`` or ``fail_switch``. A failed
  switch is shaded red; the bytes its failed load had committed are not drawn (the log does
  not say whether the load had begun or an eviction failed first). A span that loads nothing
  is an unload (idle models evicted to make room for foreign memory) or the shutdown; they
  are shaded and labelled apart, so the title's count of switches is the number of regions
  labelled "switching" (and ``statistics().switches``); of those, the title also counts the
  exchanges: the switches that took the GPU from another model (``statistics().exchanges``);
- the stack's order is fixed for the whole chart: the largest model at the bottom. The heavy
  models (which replace one another) sit at the bottom and the light ones ride on top, so a
  light model that leaves moves no other band.

On a machine with several cards every event names its card (``gpu``); ``by_card()`` splits
the log into one log per card, each rebuilt on its own (the chart draws a panel per card). A
model spanning several cards (tensor parallel) has one ``load`` and one ``evict`` event, on
its first card: they are copied to every card whose switch loaded it (each of those cards
has its own ``begin_switch`` for the model), and each card's switch says its share in its
``bytes_after``. A log without ``gpu`` (one card) is one log, drawn as always.

The chart itself (``chart_data()``, ``render_timeline()``) is in ``orchestrator.chart``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError
from orchestrator.events import Event

CHARTS_HINT = "pip install 'vram-orchestrator[charts]'"
_EVENT_FIELDS = {f.name for f in dataclasses.fields(Event)}


class TimelineError(OrchestratorError):
    """The event log cannot be read or drawn: which file, which line, what to do."""


class ChartsUnavailable(TimelineError):
    """matplotlib (the ``charts`` extra) is not installed."""

    def __init__(self) -> None:
        super().__init__(f"the VRAM timeline chart needs matplotlib: {CHARTS_HINT}")


@dataclass(frozen=True)
class Span:
    """A model holding VRAM from ``start_s`` to ``end_s`` (loading: committed, coming in)."""

    model: str
    start_s: float
    end_s: float
    bytes: int
    loading: bool = False


@dataclass(frozen=True)
class SwitchSpan:
    start_s: float
    end_s: float
    model: str | None  # the switch's target; None when it loads nothing (an unload, the shutdown)
    ok: bool
    what: str = "switch"  # "switch" (loads ``model``), "unload" (evicts only) or "shutdown"
    exchange: bool = False  # a switch that took the GPU from another model (evicted one from it)


@dataclass(frozen=True)
class Timeline:
    spans: tuple[Span, ...]
    switches: tuple[SwitchSpan, ...]
    models: tuple[str, ...]  # the stack's order, bottom first: largest first, then first appearance
    end_s: float
    restarts: tuple[float, ...] = ()  # where a later run's log begins (appended logs)

    @property
    def peak_bytes(self) -> int:
        """The most bytes committed at once."""
        # A sweep: at equal times a span that ends goes before one that starts.
        steps = sorted(
            [(s.start_s, 1, s.bytes) for s in self.spans] + [(s.end_s, 0, -s.bytes) for s in self.spans]
        )
        peak = level = 0
        for _, _, delta in steps:
            level += delta
            peak = max(peak, level)
        return peak


# -- reading -----------------------------------------------------------------------------------


def read_events(path: str | Path) -> list[Event]:
    """Read a JSON-lines event log (one ``Event.to_dict()`` per line; blank lines skipped)."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise TimelineError(
            f"{p}: file not found; give the events.jsonl that `vram-orchestrator demo` or "
            "observability.events_path wrote"
        ) from None
    except IsADirectoryError:
        raise TimelineError(f"{p}: is a folder; give the events.jsonl file in it") from None
    except OSError as exc:
        raise TimelineError(f"{p}: cannot read it ({exc.strerror}); check its permissions") from None
    events = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            if not isinstance(raw, dict):
                raise ValueError(f"expected an object, got {type(raw).__name__}")
            events.append(event_from_dict(raw))
        except (ValueError, TypeError) as exc:
            raise TimelineError(
                f"{p}:{lineno}: not an event ({exc}); the file should hold one JSON event per line"
            ) from None
    return events


def event_from_dict(raw: Mapping[str, Any]) -> Event:
    """An event from its ``to_dict()`` form; fields a later version adds are ignored."""
    return Event(**{k: v for k, v in raw.items() if k in _EVENT_FIELDS})


def budget_from_events(events: Iterable[Event]) -> int | None:
    """The budget the events carry (each has the ledger's ``budget_bytes``): the latest one,
    as a log appended to by several runs ends with the current config's. ``None`` when no
    event carries one (a log from before they did)."""
    budget: int | None = None
    for e in events:
        b = e.budget_bytes
        if isinstance(b, int) and not isinstance(b, bool) and b > 0:
            budget = b
    return budget


def read_run(events_path: str | Path) -> tuple[list[Event], int | None, float]:
    """The events, the budget and the time scale: from a ``summary.json`` beside them (the
    demo writes one) when there is one, else the budget the events carry and a scale of 1."""
    events = read_events(events_path)
    summary_path = Path(events_path).with_name("summary.json")
    budget = budget_from_events(events)
    time_scale = 1.0
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return events, budget, time_scale
    if isinstance(summary, dict):
        b = summary.get("budget_bytes")
        if isinstance(b, int) and not isinstance(b, bool) and b > 0:
            budget = b
        ts = summary.get("time_scale")
        if isinstance(ts, int | float) and not isinstance(ts, bool) and ts > 0:
            time_scale = float(ts)
    return events, budget, time_scale


# -- reconstruction ----------------------------------------------------------------------------


def _gpu_eviction(detail: str | None) -> bool:
    """Does this evict event take the model off the GPU? (``host -> disk`` does not.)"""
    d = (detail or "").strip()
    return not d.startswith("host ->")


def by_card(events: Iterable[Event]) -> list[tuple[int | None, list[Event]]]:
    """The log split per card, in card order: ``[(gpu, its events)]``; ``[(None, events)]``
    for a log whose events name no card (a machine with one card).

    An event without a card on a machine with several (none is emitted so, but a log may be
    edited by hand) goes to every card. A spanning model's ``load`` and ``evict`` go to each
    card it was loaded onto (see the module's docstring)."""
    evs = list(events)
    gpus = sorted({e.gpu for e in evs if e.gpu is not None})
    if not gpus:
        return [(None, evs)]
    out: dict[int, list[Event]] = {g: [] for g in gpus}
    loading_on: dict[str, set[int]] = {}  # model -> cards whose open switch loads it
    held_on: dict[str, set[int]] = {}  # model -> cards it was loaded onto
    budget: dict[int, int] = {}  # each card's budget, as its own events last said
    for e in evs:
        if e.gpu is None:
            targets: set[int] = set(gpus)
        elif e.kind == "transition" and e.trigger == "begin_switch":
            if e.model is not None:
                loading_on.setdefault(e.model, set()).add(e.gpu)
            targets = {e.gpu}
        elif e.kind == "transition" and e.trigger in ("finish_switch", "fail_switch"):
            if e.model is not None:
                loading_on.get(e.model, set()).discard(e.gpu)
            targets = {e.gpu}
        elif e.kind in ("load", "adopt") and e.model is not None:
            targets = {e.gpu} | loading_on.get(e.model, set())
            held_on[e.model] = set(targets)
        elif e.kind == "evict" and e.model is not None and _gpu_eviction(e.detail):
            targets = {e.gpu} | held_on.pop(e.model, set())
        else:
            targets = {e.gpu}
        if e.gpu is not None and e.budget_bytes is not None:
            budget[e.gpu] = e.budget_bytes
        for g in sorted(targets):
            # A copy on another card is that card's event: its card and budget, not the first's.
            out[g].append(
                e
                if g == e.gpu
                else dataclasses.replace(e, gpu=g, budget_bytes=budget.get(g), committed_bytes=None)
            )
    return [(g, out[g]) for g in gpus]


def reconstruct(events: Iterable[Event], sizes: Mapping[str, int] | None = None) -> Timeline:
    """Rebuild per-model residency and switch spans from an event log.

    :param sizes: known bytes per model (e.g. the config's estimates); they win over the
        bytes worked out from the switches' committed totals.
    """
    evs, restart_at = _one_clock(events)
    given = dict(sizes or {})
    learned: dict[str, int] = {}  # from each model's latest load (footprints may change)
    spans: list[Span] = []
    switches: list[SwitchSpan] = []
    models: list[str] = []
    resident: dict[str, tuple[float, int | None]] = {}  # model -> (since, bytes; None: not known yet)
    loading_from: dict[str, float] = {}  # model -> when its load began (in the open switch)
    open_switch: tuple[float, str | None, str] | None = None  # (since, target, what)
    evicted_in_switch = False  # the open switch took a model off the GPU
    floor_s = 0.0  # nothing in the open switch began before this
    end_s = evs[-1].time_s if evs else 0.0

    def note(model: str) -> None:
        if model not in models:
            models.append(model)

    def close(model: str, at: float) -> None:
        since, n = resident.pop(model)
        n = n if n is not None else learned.get(model)
        if n is not None and n > 0:
            spans.append(Span(model, since, at, n))

    for i, e in enumerate(evs):
        if i in restart_at and (resident or open_switch is not None):
            # A new run (its log appended to the last one's): whatever the last run still
            # held when its log ended is gone.
            for m in list(resident):
                close(m, e.time_s)
            if open_switch is not None:
                switches.append(SwitchSpan(open_switch[0], e.time_s, open_switch[1], False, open_switch[2]))
            open_switch = None
            evicted_in_switch = False
            loading_from.clear()
        if e.kind == "load" and e.model is not None:
            note(e.model)
            # The load began after the switch's evictions (clamped: the subtraction may be a
            # hair early, and a model must not overlap the one it replaced).
            start = max(e.time_s - (e.duration_s or 0.0), floor_s)
            loading_from[e.model] = start
            if e.model in resident:  # a load of a model we think resident: restart its span
                close(e.model, start)
            resident[e.model] = (e.time_s, given.get(e.model))
        elif e.kind == "adopt" and e.model is not None:
            # taken over in place, on the GPU already: resident from now, at what it holds
            note(e.model)
            resident[e.model] = (e.time_s, e.bytes_after)
        elif e.kind == "evict" and e.model is not None:
            if open_switch is not None and open_switch[1] is None and "(shutdown)" in (e.detail or ""):
                open_switch = (open_switch[0], None, "shutdown")  # said by its evictions too
            if open_switch is not None and _gpu_eviction(e.detail):
                evicted_in_switch = True
            if e.model in resident and _gpu_eviction(e.detail):
                close(e.model, e.time_s)
                floor_s = max(floor_s, e.time_s)
        elif e.kind == "transition" and e.trigger == "begin_switch":
            open_switch = (e.time_s, e.model, _what(e))
            evicted_in_switch = False
            floor_s = e.time_s
        elif e.kind == "transition" and e.trigger in ("finish_switch", "fail_switch"):
            # Bytes of the models loaded in this switch: what is committed now, less the rest.
            unknown = [m for m, (_, n) in resident.items() if n is None]
            if len(unknown) == 1 and e.bytes_after is not None:
                others = sum(n for m, (_, n) in resident.items() if n is not None)
                m = unknown[0]
                learned[m] = max(0, e.bytes_after - others)
            for m in unknown:  # else: as the model's last load showed, if one did
                resident[m] = (resident[m][0], learned.get(m))
            for m, start in loading_from.items():
                n_m = resident.get(m, (0.0, None))[1]
                if n_m:
                    spans.append(Span(m, start, resident[m][0], n_m, loading=True))
            loading_from.clear()
            if open_switch is not None:
                ok = e.trigger == "finish_switch"
                since, target, what = open_switch
                exchange = ok and what == "switch" and evicted_in_switch
                switches.append(SwitchSpan(since, e.time_s, target, ok, what, exchange))
            open_switch = None
            evicted_in_switch = False
    for m in list(resident):
        close(m, end_s)
    if open_switch is not None:  # the log ends inside a switch
        switches.append(SwitchSpan(open_switch[0], end_s, open_switch[1], True, open_switch[2]))
    # Models whose bytes never became known (a log cut short) are left out of the chart.
    # Stack order, fixed for the whole chart: the largest model at the bottom. The large ones
    # are the heavy models, which never share the GPU with each other: each takes the bottom
    # while it is in. The light models ride along on top, so when one leaves (a TTS model at
    # the shutdown) no band below it moves; with the light models at the bottom instead, the
    # heavy model's band would drop from the top of the stack to the floor.
    size = {m: max((s.bytes for s in spans if s.model == m), default=0) for m in models}
    return Timeline(
        spans=tuple(sorted(spans, key=lambda s: s.start_s)),
        switches=tuple(switches),
        models=tuple(sorted((m for m in models if size[m]), key=lambda m: (-size[m], models.index(m)))),
        end_s=end_s,
        restarts=tuple(evs[i].time_s for i in sorted(restart_at)),
    )


def _what(begin: Event) -> str:
    """What a switch that begins with this ``begin_switch`` does."""
    if begin.model is not None:
        return "switch"
    return "shutdown" if (begin.detail or "").startswith("shutdown") else "unload"


def _one_clock(events: Iterable[Event]) -> tuple[list[Event], set[int]]:
    """The events on one time axis, and the indices where a later run begins.

    Each run's ``time_s`` counts from its own start, and a log at
    ``observability.events_path`` is appended to by every run: a time that goes backwards
    starts a new run, which is drawn after the last one.
    """
    out: list[Event] = []
    restarts: set[int] = set()
    offset = last = 0.0
    for e in events:
        if out and e.time_s < last:
            offset = out[-1].time_s
            restarts.add(len(out))
        last = e.time_s
        out.append(dataclasses.replace(e, time_s=e.time_s + offset) if offset else e)
    return out, restarts
