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
  not say whether the load had begun or an eviction failed first).

``render_timeline()`` draws it with matplotlib (the optional ``charts`` extra, imported only
here and only when called): committed bytes per model stacked over time, the budget line,
switch spans shaded, GiB and seconds.
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
    model: str | None  # the switch's target; None for the shutdown's unload-everything
    ok: bool


@dataclass(frozen=True)
class Timeline:
    spans: tuple[Span, ...]
    switches: tuple[SwitchSpan, ...]
    models: tuple[str, ...]  # the stack's order, bottom first: by bytes, then first appearance
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


def read_run(events_path: str | Path) -> tuple[list[Event], int | None, float]:
    """The events, and the budget and time scale from a ``summary.json`` beside them, if any."""
    events = read_events(events_path)
    summary_path = Path(events_path).with_name("summary.json")
    budget: int | None = None
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
    open_switch: tuple[float, str | None] | None = None
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
                switches.append(SwitchSpan(open_switch[0], e.time_s, open_switch[1], ok=False))
            open_switch = None
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
            if e.model in resident and _gpu_eviction(e.detail):
                close(e.model, e.time_s)
                floor_s = max(floor_s, e.time_s)
        elif e.kind == "transition" and e.trigger == "begin_switch":
            open_switch = (e.time_s, e.model)
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
                switches.append(
                    SwitchSpan(open_switch[0], e.time_s, open_switch[1], ok=e.trigger == "finish_switch")
                )
            open_switch = None
    for m in list(resident):
        close(m, end_s)
    if open_switch is not None:  # the log ends inside a switch
        switches.append(SwitchSpan(open_switch[0], end_s, open_switch[1], ok=True))
    # Models whose bytes never became known (a log cut short) are left out of the chart.
    # Stack order: smaller models at the bottom. The small ones are the light models that
    # ride along across switches; at the bottom their band stays put while the heavy models
    # above them come and go.
    size = {m: max((s.bytes for s in spans if s.model == m), default=0) for m in models}
    return Timeline(
        spans=tuple(sorted(spans, key=lambda s: s.start_s)),
        switches=tuple(switches),
        models=tuple(sorted((m for m in models if size[m]), key=lambda m: size[m])),
        end_s=end_s,
        restarts=tuple(evs[i].time_s for i in sorted(restart_at)),
    )


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
    tl = reconstruct(evs, sizes)
    k = 1.0 / time_scale

    fig = Figure(figsize=(11, 5.2), dpi=110, layout="constrained")
    ax = fig.add_subplot()

    # Piecewise-constant layers, one per model (resident) plus one per model (loading),
    # evaluated on every breakpoint and stacked in the models' order of first appearance.
    times = sorted({0.0, tl.end_s, *(s.start_s for s in tl.spans), *(s.end_s for s in tl.spans)})
    x = [t * k for t in times]
    # Colours follow the order of first appearance (the first model loaded is blue).
    palette = _palette(len(tl.models))
    first_seen = sorted(tl.models, key=lambda m: min(s.start_s for s in tl.spans if s.model == m))
    colors = [palette[first_seen.index(m)] for m in tl.models]
    base = [0.0] * len(times)
    model_handles: list[Any] = []
    for i, model in enumerate(tl.models):
        for loading in (False, True):
            layer = [0.0] * len(times)
            for sp in tl.spans:
                if sp.model == model and sp.loading is loading:
                    for j in range(bisect_left(times, sp.start_s), bisect_left(times, sp.end_s)):
                        layer[j] += sp.bytes / GIB
            if not any(layer):
                continue
            top = [b + v for b, v in zip(base, layer, strict=True)]
            size = max(s.bytes for s in tl.spans if s.model == model)
            poly = ax.fill_between(
                x,
                base,
                top,
                step="post",
                facecolor=to_rgba(colors[i], 0.3 if loading else 0.9),
                hatch="///" if loading else None,
                edgecolor=colors[i] if loading else "white",
                linewidth=0.0 if loading else 0.6,
                label=None if loading else f"{model} ({format_gib(size)})",
            )
            if not loading:
                model_handles.append(poly)
            base = top
    # The committed total, as a crisp outline of the stack.
    ax.step(x, base, where="post", color="#333333", linewidth=0.9, label="committed")

    ok_label, failed_label = "switching", "failed switch"
    for sw in tl.switches:
        ax.axvspan(
            sw.start_s * k,
            sw.end_s * k,
            facecolor="#9aa0a6" if sw.ok else "#d93025",
            alpha=0.18 if sw.ok else 0.28,
            linewidth=0,
            label=ok_label if sw.ok else failed_label,
            zorder=0,
        )
        if sw.ok:
            ok_label = "_"
        else:
            failed_label = "_"
    for i, t in enumerate(tl.restarts):
        ax.axvline(t * k, color="#555555", linestyle=":", linewidth=1.2, label="restart" if i == 0 else "_")
    if any(s.loading for s in tl.spans):
        ax.fill_between(
            [], [], [], facecolor="white", edgecolor="#555555", hatch="///", label="loading (committed)"
        )

    peak = max(base, default=0.0)
    top_gib = peak
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
    ax.set_xlim(0, max(x[-1], 1e-9))
    ax.set_ylabel("committed VRAM (GiB)")
    ax.set_xlabel(
        "time (s)" if time_scale == 1 else f"time at real speed (s); the run was {k:g}x faster than real"
    )
    ax.grid(axis="y", alpha=0.3)
    ax.margins(x=0)
    n_ok = sum(1 for s in tl.switches if s.ok and s.model is not None)
    n_failed = sum(1 for s in tl.switches if not s.ok)
    peak_txt = f"peak {peak:.2f} GiB" + (f" of the {format_gib(budget_bytes)} budget" if budget_bytes else "")
    ax.set_title(
        title
        or f"VRAM timeline: {n_ok} switch{'es' if n_ok != 1 else ''}"
        + (f", {n_failed} failed switch{'es' if n_failed != 1 else ''}" if n_failed else "")
        + f", {peak_txt}",
        fontsize=12,
    )
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
