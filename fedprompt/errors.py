"""Which exceptions are the user's to fix: the CLI prints them as one line (exit status 2),
and a `fedprompt client` logs them without a traceback. Each module owns its error class; this
collects them without importing anything.
"""

from __future__ import annotations

import sys

# (module, its user-facing error class). An error can only have been raised by a module that
# was imported, so only those are looked up: no command imports torch, flwr or opacus for this.
OWNERS = (("fedprompt.config", "ConfigError"), ("fedprompt.data", "DataError"), ("fedprompt.backbone", "BackboneError"),
          ("fedprompt.payload", "PayloadError"), ("fedprompt.rundir", "RunError"), ("fedprompt.tasks", "TaskError"),
          ("fedprompt.checkpoint", "CheckpointError"), ("fedprompt.processes", "ProcessError"),
          ("fedprompt.security", "SecurityError"), ("fedprompt.certs", "CertError"),
          ("fedprompt.privacy", "PrivacyError"))


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that mean bad input (config, data, model, payload, certificates)."""
    return tuple(getattr(sys.modules[m], name) for m, name in OWNERS if m in sys.modules)
