"""The Model Management Module's Example 1 (LLM -> SDXL -> LLM) with the new API.

Runs on the embedded default config: the module's 16 GiB card on the simulated device.
`vram-orchestrator demo` runs this same workflow (plus a TTS step) for several agents at once;
its code is `orchestrator/demo.py`.

    python examples/agent_workflow.py
"""

from __future__ import annotations

import anyio

from orchestrator import Orchestrator


async def main() -> None:
    async with Orchestrator.from_config() as orch:
        # Step 1: use the LLM for intent analysis
        async with orch.acquire("llm") as lease:
            prompt = await lease.handle.run("Generate an image of Luca running on the beach")
            print(f"{orch.state.name}: {prompt}")

        # Step 2: switch to SDXL for the image (the LLM is evicted first: one heavy model at a time)
        async with orch.acquire("sdxl") as lease:
            image = await lease.handle.run(prompt, work_s=6.0)
            print(f"{orch.state.name}: {image}")

        # Step 3: switch back to the LLM for the quality evaluation
        async with orch.acquire("llm") as lease:
            evaluation = await lease.handle.run(f"Evaluate the quality of the generated image: {image}")
            print(f"{orch.state.name}: {evaluation}")

        stats = orch.statistics()
        print(
            f"{stats.switches} switches, {stats.switching_s:.2f} s switching "
            f"(at time scale {orch.config.time_scale:g}), peak {stats.peak_committed_bytes / 2**30:.2f} GiB "
            f"committed of {orch.config.budget_bytes / 2**30:.2f} GiB"
        )


if __name__ == "__main__":
    anyio.run(main)
