"""Shared test setup: offline, CPU-only, no telemetry.

Set at import (before any test module imports fedprompt, transformers or flwr) so that
subprocesses started by tests inherit the same environment. FEDPROMPT_CACHE is deliberately
left alone: the model conversions cached in ~/.cache/fedprompt are expensive to redo.
"""

from __future__ import annotations

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
# Clients' privacy ledgers and records of what servers sent: this session's, not the user's.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="fedprompt-test-state-")
os.environ["DS_ACCELERATOR"] = "cpu"
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
