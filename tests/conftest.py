"""Shared test setup: offline, CPU-only, no telemetry.

Set at import (before any test module imports fedprompt, transformers or flwr) so that
subprocesses started by tests inherit the same environment. FEDPROMPT_CACHE is deliberately
left alone: the model conversions cached in ~/.cache/fedprompt are expensive to redo.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["DS_ACCELERATOR"] = "cpu"
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
