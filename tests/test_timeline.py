"""The VRAM timeline chart: residency rebuilt from the event log, and the PNG drawn from it."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from pathlib import Path

import pytest

import orchestrator.config
from orchestrator.chart import chart_data, render_timeline
from orchestrator.demo import run_demo
from orchestrator.events import Event
from orchestrator.runtime import Orchestrator
from orchestrator.timeline import (
    ChartsUnavailable,
    Span,
    TimelineError,
    budget_from_events,
    read_events,
    read_run,
    reconstruct,
)
from states.units import GIB

pytestmark = pytest.mark.anyio

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LLM, SDXL, TTS = int(11.5 * GIB), int(10.5 * GIB), int(3.5 * GIB)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def transition(t: float, trigger: str, model: str | None, before: int, after: int, **kw: object) -> Event:
    to = {"begin_switch": "SWITCHING"}.get(trigger, kw.pop("to", "LLM_ACTIVE"))
    return Event(
        time_s=t,
        kind="transition",
        model=model,
        trigger=trigger,
        from_state=str(kw.pop("frm", "IDLE")),
        to_state=str(to),
        bytes_before=before,
        bytes_after=after,
        duration_s=kw.pop("duration_s", None),  # type: ignore[arg-type]
    )


# A small log written by hand: the LLM loads; SDXL replaces it (the LLM goes to disk); TTS
# loads beside SDXL; the LLM comes back (SDXL keeps a host copy) and fails once first.
HAND_EVENTS = [
    transition(1.0, "begin_switch", "qwen-14b", 0, LLM),
    Event(21.0, "load", "qwen-14b", duration_s=20.0, detail="from disk"),
    transition(21.0, "finish_switch", "qwen-14b", LLM, LLM, duration_s=20.0),
    Event(21.0, "grant", "qwen-14b", duration_s=20.0),
    Event(25.0, "release", "qwen-14b"),
    transition(25.0, "begin_switch", "sdxl-base", LLM, SDXL, frm="LLM_ACTIVE"),
    Event(31.0, "evict", "qwen-14b", duration_s=6.0, detail="gpu -> disk for sdxl-base"),
    Event(37.0, "load", "sdxl-base", duration_s=6.0, detail="from disk"),
    transition(37.0, "finish_switch", "sdxl-base", SDXL, SDXL, to="SDXL_ACTIVE", duration_s=12.0),
    transition(38.0, "begin_switch", "gpt-sovits-small", SDXL, SDXL + TTS, frm="SDXL_ACTIVE"),
    Event(41.0, "load", "gpt-sovits-small", duration_s=3.0, detail="from disk"),
    transition(
        41.0, "finish_switch", "gpt-sovits-small", SDXL + TTS, SDXL + TTS, to="SDXL_ACTIVE", duration_s=3.0
    ),
    # A failed switch to the LLM: SDXL went to host, the load failed; TTS stays.
    transition(45.0, "begin_switch", "qwen-14b", SDXL + TTS, LLM + TTS, frm="SDXL_ACTIVE"),
    Event(45.1, "evict", "sdxl-base", duration_s=0.1, detail="gpu -> host for qwen-14b"),
    Event(50.0, "fail", "qwen-14b", detail="load of 'qwen-14b' failed: injected"),
    transition(50.0, "fail_switch", "qwen-14b", TTS, TTS, to="TTS_ACTIVE", duration_s=5.0),
    # The retry works.
    transition(52.0, "begin_switch", "qwen-14b", TTS, LLM + TTS, frm="TTS_ACTIVE"),
    Event(72.0, "load", "qwen-14b", duration_s=20.0, detail="from disk"),
    transition(72.0, "finish_switch", "qwen-14b", LLM + TTS, LLM + TTS, duration_s=20.0),
    # Shutdown: the host copy goes (no VRAM change), then the GPU residents.
    transition(80.0, "begin_switch", None, LLM + TTS, 0, frm="LLM_ACTIVE"),
    Event(80.0, "evict", "sdxl-base", detail="host -> disk (shutdown)"),
    Event(81.0, "evict", "gpt-sovits-small", detail="gpu -> disk (shutdown)"),
    Event(87.0, "evict", "qwen-14b", detail="gpu -> disk (shutdown)"),
    transition(87.0, "finish_switch", None, 0, 0, to="IDLE"),
]


def test_residency_is_rebuilt_from_the_events() -> None:
    tl = reconstruct(HAND_EVENTS)
    resident = [s for s in tl.spans if not s.loading]
    assert resident == [
        Span("qwen-14b", 21.0, 31.0, LLM),
        Span("sdxl-base", 37.0, 45.1, SDXL),
        Span("gpt-sovits-small", 41.0, 81.0, TTS),  # the host -> disk of SDXL changes nothing
        Span("qwen-14b", 72.0, 87.0, LLM),
    ]
    loading = [(s.model, s.start_s, s.end_s) for s in tl.spans if s.loading]
    assert loading == [
        ("qwen-14b", 1.0, 21.0),
        ("sdxl-base", 31.0, 37.0),
        ("gpt-sovits-small", 38.0, 41.0),
        ("qwen-14b", 52.0, 72.0),
    ]
    assert [(s.start_s, s.end_s, s.model, s.ok) for s in tl.switches] == [
        (1.0, 21.0, "qwen-14b", True),
        (25.0, 37.0, "sdxl-base", True),
        (38.0, 41.0, "gpt-sovits-small", True),
        (45.0, 50.0, "qwen-14b", False),
        (52.0, 72.0, "qwen-14b", True),
        (80.0, 87.0, None, True),
    ]
    assert [s.what for s in tl.switches] == ["switch"] * 5 + ["shutdown"]
    assert tl.models == ("qwen-14b", "sdxl-base", "gpt-sovits-small")  # largest at the bottom
    assert tl.peak_bytes == LLM + TTS


def test_known_sizes_win_and_a_log_cut_short_still_draws() -> None:
    cut = HAND_EVENTS[:2]  # the load of the LLM, but not its finish_switch: bytes unknown
    assert reconstruct(cut).spans == ()
    tl = reconstruct(cut, sizes={"qwen-14b": LLM})
    assert [s for s in tl.spans if not s.loading] == [Span("qwen-14b", 21.0, 21.0, LLM)]


def test_each_load_has_its_own_bytes() -> None:
    """A footprint learned after the first load (a larger one) shows from the next load on."""
    bigger = LLM + GIB
    log = [
        *HAND_EVENTS[:3],
        Event(30.0, "evict", "qwen-14b", detail="gpu -> disk for sdxl-base"),
        transition(31.0, "begin_switch", "qwen-14b", 0, bigger),
        Event(51.0, "load", "qwen-14b", duration_s=20.0, detail="from disk"),
        transition(51.0, "finish_switch", "qwen-14b", bigger, bigger, duration_s=20.0),
    ]
    assert [(s.start_s, s.bytes) for s in reconstruct(log).spans if not s.loading] == [
        (21.0, LLM),
        (51.0, bigger),
    ]


def test_an_appended_log_is_drawn_run_after_run(tmp_path: Path) -> None:
    """observability.events_path is appended to: each run's clock starts again at zero."""
    crashed = HAND_EVENTS[:3]  # the LLM loaded, then the log ends (the process died)
    tl = reconstruct([*crashed, *HAND_EVENTS])
    assert tl.restarts == (22.0,)  # the second run's first event (1.0) after the first's last (21.0)
    first = [s for s in tl.spans if s.start_s < 22.0]
    assert [(s.model, s.start_s, s.end_s, s.loading) for s in first] == [
        ("qwen-14b", 1.0, 21.0, True),
        ("qwen-14b", 21.0, 22.0, False),  # closed where the next run begins
    ]
    assert len(tl.spans) == len(first) + len(reconstruct(HAND_EVENTS).spans)
    assert tl.end_s == 21.0 + 87.0
    png_ok(render_timeline([*crashed, *HAND_EVENTS], tmp_path / "appended.png"))


# -- the data the chart is drawn from ----------------------------------------------------------


def test_the_title_counts_the_regions_shaded_as_switching() -> None:
    """Five spans are shaded in HAND_EVENTS' run besides the failed one; the shutdown is one of
    them and is labelled so: the title counts the four others, as statistics().switches does."""
    data = chart_data(reconstruct(HAND_EVENTS), budget_bytes=int(15.5 * GIB))
    labels = [r.label for r in data.regions]
    assert labels == ["switching", "switching", "switching", "failed switch", "switching", "shutdown"]
    assert data.title == (
        "VRAM timeline: 4 switches (1 took the GPU from another model), 1 failed switch, "
        "peak 15.00 GiB of the 15.50 GiB budget"
    )
    # The one exchange: SDXL took the GPU from the LLM; the first load, TTS beside SDXL and the
    # LLM's return to a GPU that SDXL had already left (in the failed switch) took it from none.
    assert [s.exchange for s in reconstruct(HAND_EVENTS).switches] == [
        False,
        True,
        False,
        False,
        False,
        False,
    ]
    assert (data.regions[-1].start, data.regions[-1].end) == (80.0, 87.0)


def test_an_unload_that_loads_nothing_is_shaded_apart_and_not_counted() -> None:
    """Idle models evicted for foreign memory: a switch span with no target, not a switch."""
    log = [
        *HAND_EVENTS[:3],
        transition(30.0, "begin_switch", None, LLM, 0, frm="LLM_ACTIVE"),
        Event(31.0, "evict", "qwen-14b", detail="gpu -> disk (over the room)"),
        transition(31.0, "finish_switch", None, 0, 0, to="IDLE"),
    ]
    log[3] = dataclasses.replace(log[3], detail="unloading qwen-14b (over the room)")
    data = chart_data(reconstruct(log))
    assert [r.label for r in data.regions] == ["switching", "unloading"]
    assert (
        data.title == "VRAM timeline: 1 switch (0 took the GPU from another model), 1 unload, peak 11.50 GiB"
    )


def test_a_light_model_leaving_moves_no_other_band() -> None:
    """At the shutdown the TTS model goes first (81 s), the LLM at 87 s: the LLM's band stays
    on the floor where it was, it does not drop from the top of the stack."""
    data = chart_data(reconstruct(HAND_EVENTS))
    llm = data.band("qwen-14b")
    present = [i for i, (b, t) in enumerate(zip(llm.base_gib, llm.top_gib, strict=True)) if t > b]
    assert present, "the LLM is drawn"
    assert {llm.base_gib[i] for i in present} == {0.0}
    assert {llm.top_gib[i] for i in present} == {LLM / GIB}
    tts = data.band("gpt-sovits-small")
    during = [i for i, t in enumerate(data.x) if 72.0 <= t < 81.0]
    assert [tts.base_gib[i] for i in during] == [LLM / GIB] * len(during)  # on top of the LLM
    after = [i for i, t in enumerate(data.x) if 81.0 <= t < 87.0]
    assert after and all(llm.top_gib[i] == LLM / GIB and llm.base_gib[i] == 0 for i in after)


def test_the_last_eviction_is_drawn() -> None:
    """The axis runs past the last event, so the drop to zero at the last eviction shows."""
    data = chart_data(reconstruct(HAND_EVENTS), time_scale=0.5)
    last_event_x = 87.0 / 0.5
    assert data.x_max > last_event_x and data.x[-1] == data.x_max
    at = data.x.index(last_event_x)
    assert data.committed_gib[at - 1] == LLM / GIB  # the LLM until its eviction
    assert data.committed_gib[at:] == (0.0,) * (len(data.x) - at)  # nothing after it
    assert data.x_max - last_event_x >= 0.02 * last_event_x  # a visible stretch of it


def test_the_budget_comes_from_the_events_without_a_summary(tmp_path: Path) -> None:
    budget = int(15.5 * GIB)
    log = tmp_path / "events.jsonl"
    stamped = [dataclasses.replace(e, budget_bytes=budget) for e in HAND_EVENTS]
    log.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in stamped))
    assert budget_from_events(stamped) == budget
    assert read_run(log) == (stamped, budget, 1.0)
    assert budget_from_events(HAND_EVENTS) is None  # a log from before events carried it
    # A summary.json beside the events wins (it also carries the time scale).
    (tmp_path / "summary.json").write_text(json.dumps({"budget_bytes": 8 * GIB, "time_scale": 0.1}))
    assert read_run(log)[1:] == (8 * GIB, 0.1)


def png_ok(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000  # a real chart, not an empty canvas


def test_chart_from_a_hand_written_event_list(tmp_path: Path) -> None:
    out = render_timeline(HAND_EVENTS, tmp_path / "sub" / "chart.png", budget_bytes=int(15.5 * GIB))
    assert out == tmp_path / "sub" / "chart.png"
    png_ok(out)
    # Without a budget line, at another time scale, from a file.
    log = tmp_path / "events.jsonl"
    log.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in HAND_EVENTS) + "\n")
    assert read_events(log) == HAND_EVENTS
    png_ok(render_timeline(log, tmp_path / "b.png", time_scale=0.01))


async def test_chart_from_a_real_demo_run(tmp_path: Path) -> None:
    config = dataclasses.replace(orchestrator.config.load_config(None), time_scale=0.001)
    out = io.StringIO()
    summary = await run_demo(Orchestrator(config), agents=3, out_dir=tmp_path, stream=out)
    chart = tmp_path / "timeline.png"
    png_ok(chart)
    assert out.getvalue().rstrip().splitlines()[-1].endswith(f"VRAM timeline chart: {chart}")
    events, budget, time_scale = read_run(tmp_path / "events.jsonl")
    assert budget == summary["budget_bytes"] == config.budget_bytes
    assert time_scale == 0.001
    tl = reconstruct(events)
    assert {"qwen-14b", "sdxl-base", "gpt-sovits-small"} == set(tl.models)
    assert tl.peak_bytes == summary["peak_committed_bytes"] <= config.budget_bytes
    assert sum(1 for s in tl.switches if s.model is not None) == summary["switches"]
    data = chart_data(tl, budget_bytes=budget, time_scale=time_scale)
    took = f"({summary['exchanges']} took the GPU from another model)"
    assert data.title.startswith(f"VRAM timeline: {summary['switches']} switches {took}, ")
    assert summary["exchanges"] == sum(1 for s in tl.switches if s.exchange) == 2  # LLM -> SDXL -> LLM
    assert sum(1 for r in data.regions if r.label == "switching") == summary["switches"]
    assert [r.label for r in data.regions][-1] == "shutdown"
    for heavy in ("qwen-14b", "sdxl-base"):  # the heavy models keep the floor of the stack
        band = data.band(heavy)
        assert {b for b, t in zip(band.base_gib, band.top_gib, strict=True) if t > b} == {0.0}
    assert data.committed_gib[-1] == 0.0 and data.x_max > tl.end_s / time_scale
    # Redrawn from the log, as `vram-orchestrator timeline` does.
    png_ok(render_timeline(tmp_path / "events.jsonl", tmp_path / "again.png", budget_bytes=budget))


async def test_demo_says_how_to_get_the_chart_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ChartsUnavailable, match=r"pip install 'vram-orchestrator\[charts\]'"):
        render_timeline(HAND_EVENTS, tmp_path / "x.png")
    config = dataclasses.replace(orchestrator.config.load_config(None), time_scale=0.001)
    out = io.StringIO()
    await run_demo(Orchestrator(config), agents=1, out_dir=tmp_path, stream=out)
    last = out.getvalue().rstrip().splitlines()[-1]
    assert "pip install 'vram-orchestrator[charts]'" in last
    assert f"vram-orchestrator timeline {tmp_path}/events.jsonl" in last
    assert not (tmp_path / "timeline.png").exists()


def test_unreadable_logs_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(TimelineError, match="file not found") as e:
        read_events(tmp_path / "missing.jsonl")
    assert "\n" not in str(e.value)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(HAND_EVENTS[0].to_dict()) + "\n{not json\n")
    with pytest.raises(TimelineError, match=r"bad.jsonl:2: not an event"):
        read_events(bad)
    bad.write_text('{"kind": "load"}\n')  # no time_s
    with pytest.raises(TimelineError, match=r"bad.jsonl:1: not an event"):
        read_events(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(TimelineError, match="no events to draw"):
        render_timeline(empty, tmp_path / "x.png")
    # Unknown fields (a later version's) are ignored.
    newer = tmp_path / "newer.jsonl"
    newer.write_text(json.dumps({**HAND_EVENTS[1].to_dict(), "future_field": 1}) + "\n")
    assert read_events(newer) == [HAND_EVENTS[1]]


# -- several cards ---------------------------------------------------------------------------------

B0, B1 = 23 * GIB, 15 * GIB  # the two cards' budgets
SHARE = 13 * GIB + 512 * 2**20  # a 26 GiB model spanning both cards: its half plus the overhead


def on(gpu: int, e: Event, committed: int) -> Event:
    return dataclasses.replace(e, gpu=gpu, committed_bytes=committed, budget_bytes=(B0, B1)[gpu])


# The LLM on card 0 and SDXL on card 1 at once; then a model spanning both replaces them (one
# load and one evict event, on its first card; a begin and finish switch on each card).
TWO_CARD_EVENTS = [
    on(0, transition(1.0, "begin_switch", "qwen-14b", 0, LLM), LLM),
    on(1, transition(2.0, "begin_switch", "sdxl-base", 0, SDXL), SDXL),
    on(1, Event(8.0, "load", "sdxl-base", duration_s=6.0, detail="from disk"), SDXL),
    on(1, transition(8.0, "finish_switch", "sdxl-base", SDXL, SDXL, to="SDXL_ACTIVE"), SDXL),
    on(0, Event(21.0, "load", "qwen-14b", duration_s=20.0, detail="from disk"), LLM),
    on(0, transition(21.0, "finish_switch", "qwen-14b", LLM, LLM), LLM),
    on(0, transition(30.0, "begin_switch", "big-llm", LLM, SHARE, frm="LLM_ACTIVE"), SHARE),
    on(1, transition(30.0, "begin_switch", "big-llm", SDXL, SHARE, frm="SDXL_ACTIVE"), SHARE),
    on(0, Event(31.0, "evict", "qwen-14b", detail="gpu -> disk for big-llm"), SHARE),
    on(1, Event(31.0, "evict", "sdxl-base", detail="gpu -> disk for big-llm"), SHARE),
    on(0, Event(51.0, "load", "big-llm", duration_s=20.0, detail="from disk"), SHARE),
    on(0, transition(51.0, "finish_switch", "big-llm", SHARE, SHARE), SHARE),
    on(1, transition(51.0, "finish_switch", "big-llm", SHARE, SHARE), SHARE),
    on(0, transition(60.0, "begin_switch", None, SHARE, 0, frm="LLM_ACTIVE"), 0),
    on(1, transition(60.0, "begin_switch", None, SHARE, 0, frm="LLM_ACTIVE"), 0),
    on(0, Event(62.0, "evict", "big-llm", detail="gpu -> disk (shutdown)"), 0),
    on(0, transition(62.0, "finish_switch", None, 0, 0, to="IDLE"), 0),
    on(1, transition(62.0, "finish_switch", None, 0, 0, to="IDLE"), 0),
]


def test_a_log_of_several_cards_is_split_per_card() -> None:
    from orchestrator.timeline import by_card

    cards = by_card(TWO_CARD_EVENTS)
    assert [g for g, _ in cards] == [0, 1]
    card0, card1 = (reconstruct(evs) for _, evs in cards)
    held0 = {(s.model, s.start_s, s.end_s, s.bytes) for s in card0.spans if not s.loading}
    held1 = {(s.model, s.start_s, s.end_s, s.bytes) for s in card1.spans if not s.loading}
    assert held0 == {("qwen-14b", 21.0, 31.0, LLM), ("big-llm", 51.0, 62.0, SHARE)}
    # The spanning model's one load and evict (on card 0) hold on card 1 too, at its share.
    assert held1 == {("sdxl-base", 8.0, 31.0, SDXL), ("big-llm", 51.0, 62.0, SHARE)}
    # A copy on card 1 is card 1's event: its card and its budget.
    copies = [e for e in cards[1][1] if e.kind in ("load", "evict") and e.model == "big-llm"]
    assert [(e.kind, e.gpu, e.budget_bytes) for e in copies] == [("load", 1, B1), ("evict", 1, B1)]
    # A log that names no card is one log, as it always was.
    assert by_card(HAND_EVENTS) == [(None, HAND_EVENTS)]


def test_the_chart_has_a_panel_per_card_with_its_budget(tmp_path: Path) -> None:
    from orchestrator.chart import chart_panels

    panels = chart_panels(TWO_CARD_EVENTS, budget_bytes=38 * GIB)
    assert [(p.gpu, p.budget_bytes) for p in panels] == [(0, B0), (1, B1)]
    assert panels[0].data.title.startswith("cuda:0: 2 switches")
    assert panels[1].data.title.startswith("cuda:1: 2 switches")
    assert f"of the {B1 / GIB:.2f} GiB budget" in panels[1].data.title
    # A model has one colour on every card.
    big0, big1 = (p.data.band("big-llm") for p in panels)
    assert big0.color == big1.color
    assert panels[0].data.band("qwen-14b").color != panels[1].data.band("sdxl-base").color
    assert panels[1].data.peak_gib == pytest.approx(SHARE / GIB)
    # One card: one panel, whose budget is the one given.
    (one,) = chart_panels(HAND_EVENTS, budget_bytes=int(15.5 * GIB))
    assert one.gpu is None and one.budget_bytes == int(15.5 * GIB)
    assert one.data == chart_data(reconstruct(HAND_EVENTS), budget_bytes=int(15.5 * GIB))
    pytest.importorskip("matplotlib")
    png_ok(render_timeline(TWO_CARD_EVENTS, tmp_path / "two.png"))


def test_a_model_adopted_in_place_is_drawn_resident_from_its_adoption() -> None:
    events = [
        Event(5.0, "adopt", "qwen-14b", bytes_after=LLM, detail="on the GPU already: taken over in place"),
        Event(9.0, "evict", "qwen-14b", detail="gpu -> disk (shutdown)"),
    ]
    tl = reconstruct(events)
    assert [s for s in tl.spans if not s.loading] == [Span("qwen-14b", 5.0, 9.0, LLM)]
