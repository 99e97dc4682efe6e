"""The command line, run as a user runs it: a subprocess, exit codes, output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_plan_accepts_the_shipped_configs() -> None:
    shipped = ["simulated-16gb.yaml", "rtx5080-16gb.yaml", "gpt-sovits-server.yaml"]
    for config in [f"configs/{name}" for name in shipped]:
        out = run("plan", "--config", config)
        assert out.returncode == 0, out.stderr
        assert "budget 15.50 GiB of 16.00 GiB" in out.stdout
        assert "qwen-14b" in out.stdout and "11.50 GiB" in out.stdout
        assert out.stdout.rstrip().endswith("groups are consistent")


def test_plan_reports_a_bad_config_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "hardware: {safe_max_vram_gb: 15.5, total_vram_gb: 16}\nmodels:\n  big: {kind: sdxl, vram_gb: 16}\n"
    )
    out = run("plan", "--config", str(bad))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"{bad}: models.big.vram_gb" in lines[0]
    assert "larger than the whole budget" in lines[0] and "short 0.50 GiB" in lines[0]


def test_plan_lists_problems_of_a_config_that_parses(tmp_path: Path) -> None:
    cfg = tmp_path / "nodefault.yaml"
    cfg.write_text(
        "hardware: {safe_max_vram_gb: 15.5}\n"
        "models:\n  a: {kind: llm, vram_gb: 10}\n  b: {kind: llm, vram_gb: 11}\n"
    )
    out = run("plan", "--config", str(cfg))
    assert out.returncode == 1
    assert "defaults.llm" in out.stderr and "no default" in out.stderr


def test_plan_says_when_offload_has_no_host_tier(tmp_path: Path) -> None:
    cfg = tmp_path / "nohost.yaml"
    cfg.write_text(
        "hardware: {safe_max_vram_gb: 15.5}\n"
        "models:\n  a: {kind: sdxl, vram_gb: 10, offload: true, host_gb: 6}\n"
    )
    out = run("plan", "--config", str(cfg))
    assert out.returncode == 1
    assert "models.a.offload: true, but switching.host_ram_budget_gb is 0" in out.stderr
    assert "set switching.host_ram_budget_gb" in out.stderr


TWO_CARDS = (
    "hardware:\n  device: simulated\n  gpus:\n"
    "    - {index: 0, gpu_name: Card A, total_vram_gb: 24, safe_max_vram_gb: 23}\n"
    "    - {index: 1, gpu_name: Card B, total_vram_gb: 16, safe_max_vram_gb: 15}\n"
)


def card_tables(stdout: str) -> dict[str, dict[str, list[str]]]:
    """``plan``'s tables per card: {"cuda:0": {model: its row's cells}}."""
    tables: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in stdout.splitlines():
        if line.startswith("cuda:"):
            current = tables.setdefault(line.split()[0], {})
        elif current is not None and line.startswith("  ") and not line.split()[0] == "model":
            current[line.split()[0]] = line.split()
        elif not line.startswith("  "):
            current = None
    return tables


def test_plan_prints_a_table_per_card(tmp_path: Path) -> None:
    cfg = tmp_path / "two.yaml"
    cfg.write_text(
        TWO_CARDS + "models:\n"
        "  qwen-14b: {kind: llm, vram_gb: 11.5}\n"
        "  big-llm: {kind: llm, vram_gb: 26, tensor_parallel: 2}\n"
        "  qwen-vl: {kind: llm, vram_gb: 20}\n"
        "  sdxl-base: {kind: sdxl, vram_gb: 10.5, gpus: [1]}\n"
        "  tts: {kind: tts, vram_gb: 3.5}\n"
        "defaults: {llm: qwen-14b}\n"
    )
    out = run("plan", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{cfg}: 2 cards, simulated devices")
    assert "budget 38.00 GiB of 40.00 GiB on 2 cards" in out.stdout
    assert "cuda:0 Card A: budget 23.00 GiB of 24.00 GiB" in out.stdout
    assert "cuda:1 Card B: budget 15.00 GiB of 16.00 GiB" in out.stdout
    tables = card_tables(out.stdout)
    # SDXL may use card 1 only; the others may use both.
    assert set(tables["cuda:0"]) == {"qwen-14b", "big-llm", "qwen-vl", "tts"}
    assert set(tables["cuda:1"]) == {"qwen-14b", "big-llm", "qwen-vl", "sdxl-base", "tts"}
    assert tables["cuda:1"]["sdxl-base"][3:7] == ["10.50", "GiB", "4.50", "GiB"]
    assert " ".join(tables["cuda:1"]["sdxl-base"]).endswith("only cuda:1")
    # The spanning model reserves its half plus the per-process overhead on each card.
    assert tables["cuda:0"]["big-llm"][3:7] == ["13.50", "GiB", "9.50", "GiB"]
    assert "spans 2 cards (26.00 GiB in all)" in " ".join(tables["cuda:1"]["big-llm"])
    # 20 GiB fits card 0 only: card 1's table says it never goes there.
    assert tables["cuda:0"]["qwen-vl"][3:7] == ["20.00", "GiB", "3.00", "GiB"]
    assert "short 5.00 GiB: never here" in " ".join(tables["cuda:1"]["qwen-vl"])
    assert out.stdout.rstrip().endswith("groups are consistent")


def test_the_several_gpus_example_of_the_config_page_passes_plan(tmp_path: Path) -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    block = page[page.index("### Several GPUs") :].split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = tmp_path / "two-cards.yaml"
    cfg.write_text(block)
    out = run("plan", "--config", str(cfg))
    assert out.returncode == 0, out.stdout + out.stderr
    tables = card_tables(out.stdout)
    assert "sdxl-base" in tables["cuda:1"] and "sdxl-base" not in tables["cuda:0"]
    assert tables["cuda:0"]["qwen-32b"][3:5] == ["13.50", "GiB"]  # as the page says


@pytest.mark.parametrize(
    ("model", "key", "message"),
    [
        (
            "{kind: llm, vram_gb: 20, gpus: [1]}",
            "models.big.vram_gb",
            "20.00 GiB is larger than every card's budget it may use (15.00 GiB; short 5.00 GiB)",
        ),
        (
            "{kind: llm, vram_gb: 36, tensor_parallel: 2}",
            "models.big.tensor_parallel",
            "its share of 18.50 GiB per card fits 1 of the 2 cards it may use, and it spans 2",
        ),
    ],
)
def test_plan_says_a_model_restricted_to_too_small_cards_can_never_be_placed(
    tmp_path: Path, model: str, key: str, message: str
) -> None:
    cfg = tmp_path / "two.yaml"
    cfg.write_text(TWO_CARDS + f"models:\n  big: {model}\n")
    out = run("plan", "--config", str(cfg))
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert f"{cfg}: {key}" in line and message in line, line


def test_never_placed_names_each_model_no_card_can_take() -> None:
    """What ``plan`` checks beyond the parser: a config built in code is not parsed."""
    import dataclasses

    from orchestrator.cli_config import never_placed, plan_problems
    from orchestrator.config import parse_config

    config = parse_config(
        TWO_CARDS + "models:\n  a: {kind: llm, vram_gb: 10, gpus: [1]}\n  b: {kind: llm, vram_gb: 20, "
        "tensor_parallel: 2}\n  c: {kind: tts, vram_gb: 2}\n",
        source="<two cards>",
    )
    assert never_placed(config) == []
    grown = {
        "a": dataclasses.replace(config.models["a"], vram_bytes=16 * 2**30),  # card 1 has 15 GiB
        "b": dataclasses.replace(config.models["b"], vram_bytes=40 * 2**30),  # 20.5 GiB each: card 0 only
        "c": config.models["c"],
    }
    config = dataclasses.replace(config, models=grown)
    found = dict(never_placed(config))
    assert set(found) == {"a", "b"}
    assert found["a"] == "16.00 GiB is larger than the budget of every card it may use: cuda:1 (15.00 GiB)"
    assert found["b"].startswith("it spans 2 cards at 20.50 GiB each, and 1 of the cards it may use")
    assert "models.a: can never be placed: " + found["a"] in plan_problems(config)


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_before_or_after_the_command(tmp_path: Path, where: str) -> None:
    args = ["plan", "--config", str(tmp_path / "missing.yaml")]
    out = run(*(["--debug", *args] if where == "before" else [*args, "--debug"]))
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "ConfigError" in out.stderr
    # Without it: one line, no traceback.
    out = run(*args)
    assert out.returncode == 1 and "Traceback" not in out.stderr


def test_plan_shows_its_config_as_optional_with_its_default() -> None:
    out = run("plan", "--help")
    assert out.returncode == 0
    assert "usage: vram-orchestrator plan [-h] [--debug] [--config FILE]" in out.stdout
    assert "default: the embedded simulated 16 GiB GPU" in " ".join(out.stdout.split())
    out = run("plan")  # and it runs without one
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("<embedded simulated-16gb.yaml>: ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--agents", "0"], "argument --agents: must be at least 1, got 0"),
        (["demo", "--agents", "-2"], "argument --agents: must be at least 1, got -2"),
        (["demo", "--agents", "two"], "argument --agents: expected a whole number, got 'two'"),
        (["demo", "--time-scale", "0"], "argument --time-scale: must be a number greater than 0, got 0"),
        (["demo", "--gpus", "0"], "argument --gpus: must be at least 1, got 0"),
        (["check", "--examples", "0"], "argument --examples: must be at least 1, got 0"),
        (["check", "--steps", "-1"], "argument --steps: must be at least 1, got -1"),
        (
            ["check", "--footprint-factor", "-1"],
            "argument --footprint-factor: must be a number greater than 0, got -1",
        ),
        (
            ["check", "--footprint-factor", "nan"],
            "argument --footprint-factor: must be a number greater than 0",
        ),
    ],
)
def test_bad_numbers_are_refused_before_anything_runs(tmp_path: Path, args: list[str], message: str) -> None:
    """argparse refuses them (exit 2, its usage line, then the reason): no demo half runs and
    leaves an empty folder, no hypothesis error shows up as a FAILED check."""
    out_dir = tmp_path / "out"
    extra = ["--out", str(out_dir), "--tiny-models", "off"] if args[0] == "demo" else []
    out = run(*args, *extra)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith(f"usage: vram-orchestrator {args[0]} ")
    assert lines[-1].startswith(f"vram-orchestrator {args[0]}: error: {message}")
    assert out.stdout == "" and "Traceback" not in out.stderr
    assert not out_dir.exists()


def test_missing_config_file() -> None:
    out = run("plan", "--config", "no/such.yaml")
    assert out.returncode == 1
    assert "no/such.yaml: file not found" in out.stderr


def test_demo_end_to_end(tmp_path: Path) -> None:
    out_dir = tmp_path / "demo"
    out = run("demo", "--out", str(out_dir), "--time-scale", "0.005", "--agents", "4", "--tiny-models", "off")
    assert out.returncode == 0, out.stderr
    assert "switching:" in out.stdout and "now LLM_ACTIVE" in out.stdout
    assert "budget (within)" in out.stdout
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["agents"] == 4
    assert summary["leases"] == 16  # four steps per agent
    assert summary["switches"] >= 3  # LLM, SDXL, back to the LLM at least
    assert 0 < summary["peak_vram_bytes"] <= summary["budget_bytes"]
    events = [json.loads(line) for line in (out_dir / "events.jsonl").read_text().splitlines()]
    transitions = [e for e in events if e["kind"] == "transition"]
    assert transitions and transitions[-1]["to_state"] == "IDLE"
    assert sum(1 for e in events if e["kind"] == "grant") == 16
    transcript = (out_dir / "transcripts.txt").read_text()
    assert transcript.count("review [qwen-14b]") == 4
    # The chart is written, and the last line says where.
    chart = out_dir / "timeline.png"
    assert chart.read_bytes()[:8] == PNG_SIGNATURE
    assert out.stdout.rstrip().splitlines()[-1].endswith(f"VRAM timeline chart: {chart}")


def test_demo_on_two_simulated_cards(tmp_path: Path) -> None:
    out_dir = tmp_path / "demo"
    out = run(
        "demo", "--gpus", "2", "--out", str(out_dir), "--time-scale", "0.005", "--agents", "3",
        "--tiny-models", "off",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (
        "agents on 2 cards (Simulated RTX 5080 (16 GiB)) (simulated device), budget 31.00 GiB in all"
        in out.stdout
    )
    assert "cuda:1 switching: IDLE -> loading" in out.stdout  # progress lines name the card
    summary = json.loads((out_dir / "summary.json").read_text())
    cards = summary["cards"]
    assert [(c["index"], c["budget_bytes"]) for c in cards] == [
        (0, int(15.5 * 2**30)),
        (1, int(15.5 * 2**30)),
    ]
    assert all(0 < c["peak_vram_bytes"] <= c["budget_bytes"] for c in cards)  # both cards served
    assert sum(c["switches"] for c in cards) == summary["switches"]
    assert {m for c in cards for m in c["loaded"]} == {"qwen-14b", "sdxl-base", "gpt-sovits-small"}
    assert summary["within_budget"] is True and summary["leases"] == 12
    lines = out.stdout.splitlines()
    for c in cards:
        (line,) = [x for x in lines if x.strip().startswith(f"cuda:{c['index']} ") and "budget (" in x]
        assert "of its 15.50 GiB budget (within)" in line and f"loaded {', '.join(c['loaded'])}" in line
    assert (out_dir / "timeline.png").read_bytes()[:8] == PNG_SIGNATURE


def test_demo_gpus_needs_the_simulated_device(tmp_path: Path) -> None:
    cfg = tmp_path / "real.yaml"
    cfg.write_text("hardware: {device: nvml, safe_max_vram_gb: 15.5}\nmodels: {m: {kind: llm, vram_gb: 4}}\n")
    out = run(
        "demo", "--gpus", "2", "--config", str(cfg), "--out", str(tmp_path / "o"), "--tiny-models", "off"
    )
    assert out.returncode == 1
    assert "--gpus 2 runs on the simulated device" in out.stderr and "hardware.gpus" in out.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_check_explores_a_config() -> None:
    out = run("check", "--config", "configs/simulated-16gb.yaml", "--examples", "5", "--steps", "10")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("ok: no sequence passed the budget")


def test_check_with_footprints_larger_than_the_estimates() -> None:
    """True footprints 1.5x the estimates: loads fail within their reservation and are learned;
    the budget still holds, and check says so. The failed loads it provokes are expected: no
    log line about them. Apart from the budget, it names the models that can never fit."""
    out = run("check", "--examples", "15", "--steps", "10", "--footprint-factor", "1.5")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stderr == ""  # no "ERROR orchestrator: failed load of ..."
    lines = out.stdout.strip().splitlines()
    assert "true footprints 1.5x the estimates" in lines[0]
    assert lines[1].startswith("ok: no sequence passed the budget")
    assert lines[2].startswith(
        "unusable at 1.5x: 6 of 7 models can never be loaded within the 15.50 GiB budget"
    )
    # 1.5x and the 5% margin: qwen-14b 11.5 GiB -> 18.11 GiB; the TTS model (5.25 GiB) fits.
    assert "qwen-14b (needs 18.11 GiB)" in lines[2] and "sdxl-base (needs 16.54 GiB)" in lines[2]
    assert "gpt-sovits-small" not in lines[2]
    assert len(lines) == 3


def test_check_logs_the_injected_failures_with_debug() -> None:
    out = run("check", "--examples", "5", "--steps", "10", "--footprint-factor", "1.5", "--debug")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "orchestrator" in out.stderr  # the debug log is not silenced


# -- status --------------------------------------------------------------------------------------


def test_status_prints_an_aligned_table() -> None:
    out = run("status")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("<embedded simulated-16gb.yaml>") and "not running" in lines[0]
    assert lines[1] == "device   Simulated RTX 5080 (16 GiB) (numbers from: simulated)"
    assert "total 16.00 GiB, budget 15.50 GiB, used on the device 0.00 GiB" in lines[2]
    assert lines[3].startswith("state    IDLE")
    table = lines[lines.index("") + 1 :]
    head = table[0]
    assert head.split() == ["model", "kind", "class", "tier", "estimated", "learned", "measured"]
    rows = {r.split()[0]: r for r in table[1:]}
    assert set(rows) == {
        "qwen-14b",
        "qwen-vl-7b",
        "qwen-coder-7b",
        "sdxl-base",
        "sdxl-lora",
        "sdxl-lora-controlnet",
        "gpt-sovits-small",
    }
    assert rows["qwen-14b"].split()[1:5] == ["llm", "heavy", "disk", "11.50"]
    assert rows["gpt-sovits-small"].split()[1:5] == ["tts", "light", "disk", "3.50"]
    assert rows["sdxl-base"].rstrip().endswith("default")
    # Aligned: every column starts where its heading does; numbers end where theirs does.
    for col in ("kind", "class", "tier"):
        i = head.split().index(col)
        assert {r.index(r.split()[i], len(r.split()[0])) for r in table[1:]} == {head.index(col)}
    end = head.index("estimated") + len("estimated")
    assert {r[:end].rstrip()[-3:] for r in table[1:]} == {"GiB"}


def test_status_json_is_one_object_with_integer_bytes() -> None:
    out = run("status", "--json", "--config", "configs/simulated-16gb.yaml")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["device"]["source"] == "simulated"
    assert report["device"]["total_bytes"] == 16 * 1024**3
    assert report["budget_bytes"] == int(15.5 * 1024**3)
    assert report["state"] == "IDLE" and report["committed_bytes"] == 0
    models = {m["name"]: m for m in report["models"]}
    assert models["qwen-14b"]["tier"] == "disk"
    assert models["qwen-14b"]["estimated_bytes"] == int(11.5 * 1024**3)
    assert models["qwen-14b"]["kind"] == "llm" and models["qwen-14b"]["default"] is True
    for m in models.values():
        assert isinstance(m["estimated_bytes"], int)
        assert m["measured_bytes"] is None or isinstance(m["measured_bytes"], int)


def test_status_with_a_bad_config_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("hardware: {safe_max_vram_gb: 15.5}\nmodels:\n  a: {kind: llm, vram_gb: -1}\n")
    out = run("status", "--config", str(bad))
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1
    assert f"{bad}: models.a.vram_gb" in out.stderr and "Traceback" not in out.stderr


# -- timeline ------------------------------------------------------------------------------------

GIB = 1024**3
SMALL_LOG = [
    {"time_s": 0.0, "kind": "transition", "model": "m", "trigger": "begin_switch", "from_state": "IDLE",
     "to_state": "SWITCHING", "bytes_before": 0, "bytes_after": 4 * GIB},
    {"time_s": 2.0, "kind": "load", "model": "m", "duration_s": 2.0, "detail": "from disk"},
    {"time_s": 2.0, "kind": "transition", "model": "m", "trigger": "finish_switch", "from_state": "SWITCHING",
     "to_state": "LLM_ACTIVE", "bytes_before": 4 * GIB, "bytes_after": 4 * GIB, "duration_s": 2.0},
    {"time_s": 9.0, "kind": "evict", "model": "m", "detail": "gpu -> disk (shutdown)"},
]  # fmt: skip


def write_log(folder: Path, summary: dict[str, object] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "events.jsonl"
    log.write_text("".join(json.dumps(e) + "\n" for e in SMALL_LOG))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return log


def test_timeline_draws_a_chart(tmp_path: Path) -> None:
    log = write_log(tmp_path / "run", {"budget_bytes": 6 * GIB, "time_scale": 0.5})
    chart = tmp_path / "out" / "chart.png"
    out = run("timeline", str(log), "-o", str(chart))
    assert out.returncode == 0, out.stderr
    assert chart.read_bytes()[:8] == PNG_SIGNATURE
    assert out.stdout.strip() == (
        f"wrote {chart}: 4 events, 1 switches, 1 models, peak 4.00 GiB committed; budget 6.00 GiB"
    )
    # Default output: timeline.png beside the events; --budget-gb wins over summary.json.
    out = run("timeline", str(log), "--budget-gb", "5")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "timeline.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "budget 5.00 GiB" in out.stdout


def test_timeline_takes_the_budget_from_the_events_without_a_summary(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    log = tmp_path / "events.jsonl"
    log.write_text("".join(json.dumps({**e, "budget_bytes": 6 * GIB}) + "\n" for e in SMALL_LOG))
    out = run("timeline", str(log), "-o", str(tmp_path / "c.png"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("peak 4.00 GiB committed; budget 6.00 GiB")
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_SIGNATURE


def test_timeline_of_an_old_log_without_budget_says_how_to_add_it(tmp_path: Path) -> None:
    log = write_log(tmp_path)  # events from before they carried budget_bytes
    out = run("timeline", str(log), "-o", str(tmp_path / "c.png"))
    assert out.returncode == 0, out.stderr
    assert "no budget line (the events carry no budget; give --budget-gb)" in out.stdout
    assert (tmp_path / "c.png").exists()


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("none", [], "missing.jsonl: file not found"),
        ("garbage", [], "events.jsonl:1: not an event"),
        ("empty", [], "no events to draw"),
        ("ok", ["--budget-gb", "-1"], "--budget-gb must be positive"),
    ],
)
def test_timeline_errors_are_one_line(tmp_path: Path, setup: str, args: list[str], message: str) -> None:
    log = tmp_path / ("missing.jsonl" if setup == "none" else "events.jsonl")
    if setup == "garbage":
        log.write_text("this is not json\n")
    elif setup == "empty":
        log.write_text("")
    elif setup == "ok":
        write_log(tmp_path)
    out = run("timeline", str(log), "-o", str(tmp_path / "c.png"), *args)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vram-orchestrator timeline: error: ")
    assert message in lines[0]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "c.png").exists()


def test_help_lists_the_new_commands() -> None:
    out = run("--help")
    assert out.returncode == 0
    assert "status" in out.stdout and "timeline" in out.stdout
