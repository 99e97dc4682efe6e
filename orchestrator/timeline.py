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

``chart_data()`` works out everything the chart shows (the stacked bands, the shaded regions,
the title, the axis range) as plain numbers; ``render_timeline()`` draws it with matplotlib
(the optional ``charts`` extra, imported only there and only when called): committed bytes per
model stacked over time, the budget line, switch spans shaded, GiB and seconds.
"""

from __future__ import annotations

import dataclasses
import json
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError
from orchestrator.events import Event
from states.units import GIB, format_gib

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


# -- drawing -----------------------------------------------------------------------------------


def _import_matplotlib() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ChartsUnavailable() from None
    return Figure


def charts_available() -> bool:
    try:
        _import_matplotlib()
    except ChartsUnavailable:
        return False
    return True


@dataclass(frozen=True)
class Band:
    """One layer of the stack: a model's bytes (resident, or loading) over the chart's x."""

    model: str
    loading: bool
    base_gib: tuple[float, ...]  # at each x, where the layer starts
    top_gib: tuple[float, ...]  # and where it ends (equal to base where the model is absent)
    color: str
    label: str  # "qwen-14b (11.50 GiB)"


@dataclass(frozen=True)
class Region:
    """A shaded span of the x axis (a switch, a failed one, an unload, the shutdown)."""

    start: float
    end: float
    label: str  # "switching", "failed switch", "unloading" or "shutdown"


REGION_STYLE = {  # label -> (face colour, alpha, hatch)
    "switching": ("#9aa0a6", 0.18, None),
    "failed switch": ("#d93025", 0.28, None),
    "unloading": ("#9aa0a6", 0.10, None),
    "shutdown": ("#5f6368", 0.08, "..."),
}


@dataclass(frozen=True)
class ChartData:
    """Everything the chart shows, in its own units (seconds at the chart's speed, GiB)."""

    x: tuple[float, ...]  # breakpoints, piecewise constant after each (step "post")
    bands: tuple[Band, ...]  # bottom first
    committed_gib: tuple[float, ...]  # the stack's top at each x
    regions: tuple[Region, ...]
    restarts: tuple[float, ...]
    x_max: float  # the axis' end: past the last event, so the last eviction shows
    peak_gib: float
    title: str

    def band(self, model: str, *, loading: bool = False) -> Band:
        for b in self.bands:
            if b.model == model and b.loading is loading:
                return b
        raise KeyError(f"no {'loading ' if loading else ''}band for {model!r}")


def chart_data(
    tl: Timeline, *, budget_bytes: int | None = None, time_scale: float = 1.0, title: str | None = None
) -> ChartData:
    """The numbers the chart is drawn from (pure: no matplotlib), for ``render_timeline``."""
    if time_scale <= 0:
        raise TimelineError(f"time_scale must be positive, got {time_scale!r}")
    k = 1.0 / time_scale
    # The axis runs a little past the last event: the last eviction (the shutdown's) happens
    # at the last event, and a drop to zero on the axis' edge cannot be seen.
    pad_s = max(tl.end_s * 0.03, 1e-3)
    t_max = tl.end_s + pad_s
    times = sorted({0.0, tl.end_s, t_max, *(s.start_s for s in tl.spans), *(s.end_s for s in tl.spans)})
    x = tuple(t * k for t in times)
    # Colours follow the order of first appearance (the first model loaded is blue).
    palette = _palette(len(tl.models))
    first_seen = sorted(tl.models, key=lambda m: min(s.start_s for s in tl.spans if s.model == m))
    base = [0.0] * len(times)
    bands: list[Band] = []
    for model in tl.models:
        color = palette[first_seen.index(model)]
        size = max(s.bytes for s in tl.spans if s.model == model)
        for loading in (False, True):
            layer = [0.0] * len(times)
            for sp in tl.spans:
                if sp.model == model and sp.loading is loading:
                    for j in range(bisect_left(times, sp.start_s), bisect_left(times, sp.end_s)):
                        layer[j] += sp.bytes / GIB
            if not any(layer):
                continue
            top = [b + v for b, v in zip(base, layer, strict=True)]
            bands.append(
                Band(model, loading, tuple(base), tuple(top), color, f"{model} ({format_gib(size)})")
            )
            base = top
    labels = {"switch": "switching", "unload": "unloading", "shutdown": "shutdown"}
    regions = tuple(
        Region(sw.start_s * k, sw.end_s * k, labels.get(sw.what, "switching") if sw.ok else "failed switch")
        for sw in tl.switches
    )
    peak = max(base, default=0.0)
    n_ok = sum(1 for r in regions if r.label == "switching")
    n_exchanges = sum(1 for sw in tl.switches if sw.exchange)
    n_failed = sum(1 for r in regions if r.label == "failed switch")
    n_unloads = sum(1 for r in regions if r.label == "unloading")
    peak_txt = f"peak {peak:.2f} GiB" + (f" of the {format_gib(budget_bytes)} budget" if budget_bytes else "")
    title = title or (
        f"VRAM timeline: {_plural(n_ok, 'switch')}"
        + (f" ({n_exchanges} took the GPU from another model)" if n_ok else "")
        + (f", {_plural(n_failed, 'failed switch')}" if n_failed else "")
        + (f", {_plural(n_unloads, 'unload')}" if n_unloads else "")
        + f", {peak_txt}"
    )
    return ChartData(
        x=x,
        bands=tuple(bands),
        committed_gib=tuple(base),
        regions=regions,
        restarts=tuple(t * k for t in tl.restarts),
        x_max=t_max * k,
        peak_gib=peak,
        title=title,
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else ('es' if word.endswith('ch') else 's')}"


def render_timeline(
    events: Sequence[Event] | str | Path,
    out_path: str | Path,
    *,
    budget_bytes: int | None = None,
    time_scale: float = 1.0,
    sizes: Mapping[str, int] | None = None,
    title: str | None = None,
) -> Path:
    """Draw the VRAM timeline of an event log into a PNG; returns its path.

    :param events: the events, or the path of an ``events.jsonl``.
    :param budget_bytes: drawn as a horizontal line; ``None`` leaves it out.
    :param time_scale: the simulation's time scale: times are divided by it, so that a run
        at ``time_scale=0.01`` is drawn at real speed (and the axis says so).
    :param sizes: known bytes per model (see ``reconstruct``).
    :raises ChartsUnavailable: matplotlib is not installed.
    :raises TimelineError: the log cannot be read or holds no events.
    """
    Figure = _import_matplotlib()
    from matplotlib.colors import to_rgba

    if isinstance(events, str | Path):
        source = Path(events)
        evs = read_events(source)
    else:
        source, evs = None, list(events)
    if not evs:
        raise TimelineError(f"{source or 'the event list'}: no events to draw; run the orchestrator first")
    if time_scale <= 0:
        raise TimelineError(f"time_scale must be positive, got {time_scale!r}")
    data = chart_data(reconstruct(evs, sizes), budget_bytes=budget_bytes, time_scale=time_scale, title=title)

    fig = Figure(figsize=(11, 5.2), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    model_handles: list[Any] = []
    for band in data.bands:
        poly = ax.fill_between(
            data.x,
            band.base_gib,
            band.top_gib,
            step="post",
            facecolor=to_rgba(band.color, 0.3 if band.loading else 0.9),
            hatch="///" if band.loading else None,
            edgecolor=band.color if band.loading else "white",
            linewidth=0.0 if band.loading else 0.6,
            label=None if band.loading else band.label,
        )
        if not band.loading:
            model_handles.append(poly)
    # The committed total, as a crisp outline of the stack.
    ax.step(data.x, data.committed_gib, where="post", color="#333333", linewidth=0.9, label="committed")

    labelled: set[str] = set()
    for r in data.regions:
        face, alpha, hatch = REGION_STYLE[r.label]
        ax.axvspan(
            r.start,
            r.end,
            facecolor=to_rgba(face, alpha),
            hatch=hatch,
            edgecolor=to_rgba(face, 0.35) if hatch else "none",
            linewidth=0,
            label="_" if r.label in labelled else r.label,
            zorder=0,
        )
        labelled.add(r.label)
    for i, t in enumerate(data.restarts):
        ax.axvline(t, color="#555555", linestyle=":", linewidth=1.2, label="restart" if i == 0 else "_")
    if any(b.loading for b in data.bands):
        ax.fill_between(
            [], [], [], facecolor="white", edgecolor="#555555", hatch="///", label="loading (committed)"
        )

    top_gib = data.peak_gib
    if budget_bytes is not None:
        ax.axhline(budget_bytes / GIB, color="#c5221f", linestyle="--", linewidth=1.6)
        ax.annotate(
            f"budget {format_gib(budget_bytes)}",
            xy=(1.0, budget_bytes / GIB),
            xycoords=("axes fraction", "data"),
            xytext=(-4, 4),
            textcoords="offset points",
            ha="right",
            va="bottom",
            color="#c5221f",
            fontsize=9,
        )
        top_gib = max(top_gib, budget_bytes / GIB)
    ax.set_ylim(0, max(1.0, top_gib * 1.12))
    ax.set_xlim(0, max(data.x_max, 1e-9))
    ax.set_ylabel("committed VRAM (GiB)")
    ax.set_xlabel(
        "time (s)"
        if time_scale == 1
        else f"time at real speed (s); the run was {1 / time_scale:g}x faster than real"
    )
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(data.title, fontsize=12)
    # The models in the legend read top-down, as the stack does.
    handles, _ = ax.get_legend_handles_labels()
    handles = [*reversed(model_handles), *(h for h in handles if h not in model_handles)]
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=9,
        frameon=False,
    )

    out = Path(out_path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
    except OSError as exc:
        raise TimelineError(
            f"{out}: cannot write the chart ({exc.strerror}); choose a writable path"
        ) from None
    return out


def _palette(n: int) -> list[str]:
    base = [
        "#4e79a7",  # blue
        "#f28e2b",  # orange
        "#59a14f",  # green
        "#b07aa1",  # purple
        "#76b7b2",  # teal
        "#edc948",  # yellow
        "#9c755f",  # brown
        "#ff9da7",  # pink
        "#bab0ac",  # grey
    ]
    return [base[i % len(base)] for i in range(n)]
