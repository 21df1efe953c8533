"""A participant changed by a test to lie (tests/test_untrusted_e2e.py) or to die
(tests/test_secagg_e2e.py): with this folder on PYTHONPATH and FEDPROMPT_TEST_LIE=client (a
`fedprompt client` process), =server (the ServerApp process a `fedprompt server` starts) or
=die-after-keys (a client), the real fedprompt code is patched as it is imported. The lies are
what an attacker who edits their own installation would send over the real wire; nothing here
ships with fedprompt."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

LIE = os.environ.get("FEDPROMPT_TEST_LIE", "")


def lie_as_client(handler) -> None:
    """init: a different initial payload; round 1: a huge example count, the update flipped
    and an unknown metric; its evaluations: accuracy 1.0 on a billion examples; round 2: a NaN
    training loss; round 3: hangs."""
    import time

    from fedprompt.protocol import NUM_EXAMPLES, Kind

    init, fit, evaluate = (handler.KINDS[k] for k in (Kind.INIT, Kind.FIT, Kind.EVALUATE))

    def lying_init(client, req, tensors, worker):
        reply = init(client, req, tensors, worker)
        reply.tensors = {k: v + 1 for k, v in reply.tensors.items()}
        return reply

    def lying_fit(client, req, tensors, worker):
        if req.round == 3:
            time.sleep(3600)
        reply = fit(client, req, tensors, worker)
        if req.round == 1:
            g = {k: t.numpy() for k, t in tensors.items()}
            reply.tensors = {k: g[k] - (v - g[k]) for k, v in reply.tensors.items()}
            reply.metrics[NUM_EXAMPLES] = int(reply.metrics[NUM_EXAMPLES]) * 10**6
            reply.metrics["leak"] = 42.0
        if req.round == 2:
            reply.metrics["train_loss"] = float("nan")
        return reply

    def lying_evaluate(client, req, tensors, worker):
        reply = evaluate(client, req, tensors, worker)
        reply.metrics.update({"accuracy": 1.0, NUM_EXAMPLES: 10**9})
        return reply

    handler.KINDS.update({Kind.INIT: lying_init, Kind.FIT: lying_fit, Kind.EVALUATE: lying_evaluate})


def lie_as_server(evaluation) -> None:
    """Round 3's global, as sent to every client to evaluate, is the true one x 1000 (a crafted
    global: a planted prompt reaches a client in any message that carries the global)."""
    from fedprompt.wire import from_record, to_record

    real = evaluation.exchange

    def exchange(grid, messages, timeout, poll=0.1):
        crafted = None
        for m in messages:
            if m.metadata.message_type == "evaluate" and int(m.content["config"]["server-round"]) == 3:
                # The messages may share one content: craft once, then give it to each.
                crafted = crafted or to_record({k: v * 1000 for k, v in from_record(m.content["arrays"]).items()})
                m.content["arrays"] = crafted
        return real(grid, messages, timeout, poll)

    evaluation.exchange = exchange


def die_after_keys(secagg) -> None:
    """SIGKILL this client's whole process group (the machine dies) when round 2's masked
    update is asked for: its key shares went out in share-keys, its masked update never does."""
    import signal

    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    guard = secagg.unmask_guard_mod

    def dying_guard(msg, ctxt, call_next):
        if secagg.stage_of(msg) == Stage.COLLECT_MASKED_VECTORS and int(msg.content["config"]["server-round"]) == 2:
            os.killpg(os.getpgid(0), signal.SIGKILL)
        return guard(msg, ctxt, call_next)

    secagg.unmask_guard_mod = dying_guard


TARGETS = {
    "client": ("fedprompt.client.handler", lie_as_client),
    "server": ("fedprompt.server.evaluation", lie_as_server),
    "die-after-keys": ("fedprompt.client.secagg", die_after_keys),
}


class _Patch(importlib.abc.MetaPathFinder):
    """Runs the lie right after the target module is first imported."""

    def __init__(self, name: str, patch):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        real = spec.loader.exec_module

        def exec_module(module):
            real(module)
            self.patch(module)

        spec.loader.exec_module = exec_module
        return spec


if LIE in TARGETS:
    sys.meta_path.insert(0, _Patch(*TARGETS[LIE]))
