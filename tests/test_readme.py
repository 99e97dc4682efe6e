"""The README and docs/ as a new user meets them: the commands CI reads, the examples run as
written from any folder, the configs shown parse, and every link leads somewhere."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
FAKE_SERVER = str(ROOT / "tests" / "fixtures" / "fake_openai_server.py")
TEST_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && "
    ".venv/bin/pip install -q -e '.[dev,diffusers,ray]' && .venv/bin/python -m pytest -q"
)


def block_after(text: str, heading: str, lang: str) -> str:
    """The first ```lang block after ``heading``."""
    start = text.index(heading)
    m = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, start)
    assert m is not None, f"no {lang} block after {heading!r}"
    return m.group(1)


def blocks(text: str, lang: str) -> list[str]:
    """Every ```lang block of a page, in order."""
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter, in ``cwd``, on the embedded default config."""
    env = {k: v for k, v in os.environ.items() if k != "VRAM_ORCHESTRATOR_CONFIG"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd, env=env
    )


def test_the_test_command_is_where_ci_reads_it() -> None:
    """.ci/run reads the line two below the marker with awk; it must be the test command."""
    out = subprocess.run(
        ["awk", "/<!-- test-command -->/{getline; getline; print; exit}", str(README)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == TEST_COMMAND
    lines = README.read_text().splitlines()
    at = lines.index("<!-- test-command -->")
    assert lines[at + 1 : at + 4] == ["```bash", TEST_COMMAND, "```"]


def test_the_demo_quick_start_is_one_command_line() -> None:
    block = block_after(README.read_text(), "## Quick start", "bash")
    assert block.count("\n") == 1  # one line, ready to paste
    assert block.startswith("python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && ")
    assert block.rstrip().endswith("&& .venv/bin/vram-orchestrator demo")


def test_the_readme_is_an_introduction() -> None:
    text = README.read_text()
    assert 150 <= len(text.splitlines()) <= 250
    assert "![" in text and (ROOT / "docs" / "images" / "demo-timeline.png").stat().st_size < 100_000


def test_the_api_example_runs_from_any_folder(tmp_path: Path) -> None:
    """The tour's acquire() example, as written, run from a folder that is not the checkout."""
    out = run_python(block_after(README.read_text(), "### In your program", "python"), tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip(), "it prints the statistics"


def plan(config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``vram-orchestrator plan --config config``, run from ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "plan", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_the_api_page_example_prints_what_the_page_shows(tmp_path: Path) -> None:
    """docs/api.md's first example, as written, prints a summary line for line in the shape of
    the one the page shows (the same words; only the figures may differ)."""
    page = (ROOT / "docs" / "api.md").read_text()
    out = run_python(blocks(page, "python")[0], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    shown = block_after(page, "print(orch.statistics())` prints", "").strip().splitlines()
    printed = out.stdout.strip().splitlines()
    assert len(printed) == len(shown), out.stdout

    def shape(line: str) -> str:
        return re.sub(r"\d+(\.\d+)?", "N", line.strip())

    assert [shape(line) for line in printed] == [shape(line) for line in shown]


@pytest.mark.parametrize(
    "page, heading",
    [
        ("README.md", "### Code written for the Model Management Module"),
        ("docs/model-management-module.md", "## The same code"),
    ],
)
def test_the_model_manager_examples_run(page: str, heading: str, tmp_path: Path) -> None:
    """Code written for the Model Management Module, as the pages show it, runs as it is."""
    out = run_python(block_after((ROOT / page).read_text(), heading, "python"), tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_config_reference_passes_plan(tmp_path: Path) -> None:
    """docs/configuration.md's "every key" config, as written, is a valid config."""
    config = tmp_path / "every-key.yaml"
    config.write_text(block_after((ROOT / "docs" / "configuration.md").read_text(), "## Every key", "yaml"))
    out = plan(config, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "fairness: the measured cost of each switch" in out.stdout


HARDWARE = "hardware: {device: simulated, total_vram_gb: 16.0, safe_max_vram_gb: 15.5}\n"


def test_the_backend_examples_parse() -> None:
    """Every model config docs/backends.md shows parses, as written (under a hardware section),
    into the backend it names; the demo's config in docs/cli.md parses on its own."""
    from orchestrator import parse_config

    examples = blocks((ROOT / "docs" / "backends.md").read_text(), "yaml")
    assert len(examples) == 4
    *models, cache = examples
    backends = []
    for i, text in enumerate(models):
        config = parse_config(HARDWARE + text, source=f"backends.md, example {i + 1}")
        backends += [m.backend for m in config.models.values()]
    assert backends == ["server", "vllm", "diffusers", "diffusers", "tts"]
    # the disk tier's cache section, beside the first example's models
    config = parse_config(HARDWARE + models[0] + cache, source="backends.md, the cache example")
    assert config.cache is not None and config.cache.budget_bytes == 50 * 2**30 and config.cache.verify
    demo = block_after((ROOT / "docs" / "cli.md").read_text(), "**Your own models.**", "yaml")
    assert list(parse_config(demo, source="cli.md").models) == ["qwen-14b", "sdxl-base", "mms-tts"]


def test_the_daemon_page_shows_the_defaults() -> None:
    """docs/daemon.md's ``daemon:`` section says "all optional": its values are the defaults."""
    from orchestrator import parse_config
    from orchestrator.spec import DaemonSpec

    text = block_after((ROOT / "docs" / "daemon.md").read_text(), "## Configuration", "yaml")
    config = parse_config(HARDWARE + text + "models: {m: {kind: llm, vram_gb: 1}}\n", source="daemon.md")
    assert config.daemon == DaemonSpec()


def test_the_config_example_passes_plan(tmp_path: Path) -> None:
    """The tour's config, as written (its model paths are the user's to fill in)."""
    config = tmp_path / "my-machine.yaml"
    config.write_text(block_after(README.read_text(), "### Your machine: a config", "yaml"))
    out = plan(config, ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "host-RAM tier 12.00 GiB" in out.stdout
    assert out.stdout.rstrip().endswith("groups are consistent")


def test_the_openai_example_talks_to_serve(tmp_path: Path) -> None:
    """The tour's serve example: the openai client, as written, against a running daemon whose
    LLM is an OpenAI-compatible server."""
    pytest.importorskip("openai")
    llm = {
        "kind": "llm",
        "vram_gb": 11.5,
        "backend": {
            "type": "server",
            "command": [sys.executable, FAKE_SERVER, "--port", "{port}", "--model", "{model}"],
            "start_timeout_s": 20,
            "stop_grace_s": 2,
            "log_dir": str(tmp_path / "logs"),
        },
    }
    config = tmp_path / "my-machine.yaml"
    config.write_text(
        json.dumps(
            {
                "hardware": {"device": "simulated", "total_vram_gb": 16, "safe_max_vram_gb": 15.5},
                "simulation": {"time_scale": 0.01},
                "monitor": {"sample_hz": 0, "footprints_path": None},
                "models": {"qwen-14b": llm},
            }
        )
    )
    daemon = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "serve", "--config", str(config), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        url = wait_for_url(daemon)
        code = block_after(README.read_text(), "### Every program on the machine", "python")
        assert "http://127.0.0.1:8470/v1" in code
        code = code.replace("http://127.0.0.1:8470", url)
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.strip() == "echo: Write an image prompt for a lighthouse in a storm"
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        rc = daemon.wait(timeout=30)
        assert daemon.stdout is not None
        daemon.stdout.close()
    assert rc == 0


def wait_for_url(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> str:
    """The URL in serve's first line: ``vram-orchestrator serving ... on URL (pid N)``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            seen += line
            m = re.search(rb" on (http://\S+) \(pid \d+\)", line)
            if m:
                return m.group(1).decode()
            if not line:
                break
    raise AssertionError(f"serve did not say where it listens: {seen.decode(errors='replace')}")


# -- links and words -------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", [README, *DOCS, ROOT / "benchmarks" / "README.md"], ids=lambda p: p.name)
def test_every_link_leads_somewhere(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    if page in (README, ROOT / "docs" / "index.md"):
        assert len(links) >= 9  # every docs page is reachable from both
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: {link} leads nowhere"
        if anchor:
            assert anchor in anchors(path), f"{page.name}: {link}: no heading #{anchor} in {path.name}"


@pytest.mark.parametrize("page", [README, *DOCS, ROOT / "benchmarks" / "README.md"], ids=lambda p: p.name)
def test_pages_speak_of_the_project_and_the_users_machine(page: Path) -> None:
    text = page.read_text()
    for words in ("FIELD-NOTES", "these machines", "../shared", "lent", "session"):
        assert not re.search(rf"\b{re.escape(words)}\b", text, re.I), f"{page.name} mentions {words!r}"
    if "design document" in text and page.name != "model-management-module.md":
        assert "model-management-module.md" in text, f"{page.name}: 'the design document' without its page"


def test_the_several_gpus_example_parses_as_written() -> None:
    """docs/gpus.md's config: two cards, a spanning model, a model kept to one card."""
    from orchestrator.config import parse_config

    text = block_after((ROOT / "docs" / "gpus.md").read_text(), "## The config", "yaml")
    config = parse_config(text.replace("device: auto", "device: simulated"), source="gpus.md")
    assert [c.index for c in config.cards] == [0, 1]
    assert config.models["qwen-32b"].tensor_parallel == 2 and config.models["tts"].gpus == (1,)
    assert config.models["qwen-32b"].backend == "vllm"
