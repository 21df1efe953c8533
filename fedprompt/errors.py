"""User errors: bad input the user must fix (config, data, model, payload, certificates, the
run directory). Every module's own error class subclasses `UserError`; the CLI prints one as one
line and exits with status 2, and a `fedprompt client` logs it without a traceback. A leaf
module: every other module may import it.
"""

from __future__ import annotations


class UserError(Exception):
    """An error whose message names the problem and the fix; never a bug."""
