"""``python -m orchestrator`` is the ``vram-orchestrator`` command."""

from __future__ import annotations

import sys

from orchestrator.cli import main

sys.exit(main())
