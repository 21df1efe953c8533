"""The ClientApp: a thin bridge from Flower messages to `handler.handle`.

In simulation the handler runs right here, in the long-lived Ray worker, on a LocalClient
cached per process. In deployment this ClientApp object runs inside the `fedprompt client`
process (worker.py, executor.py), which registered its own handler with `serve_in_process`:
nothing the server's run says (its run config, its app bundle) chooses what runs there.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedprompt.client import secagg
from fedprompt.protocol import KIND_OF, NUM_EXAMPLES, Kind, Reply, Request
from fedprompt.wire import from_record, to_record

app = ClientApp()

_IN_PROCESS = None  # the `fedprompt client` process's handler: Request -> Reply


def serve_in_process(handler) -> None:
    """Make this process a `fedprompt client`: every message goes to `handler`."""
    global _IN_PROCESS
    _IN_PROCESS = handler


def request_of(msg: Message, context: Context) -> Request:
    """The Request a Flower message carries (its kind from the message type)."""
    config = dict(msg.content.get("config", ConfigRecord()))
    return Request(
        kind=KIND_OF[msg.metadata.message_type],
        round=int(config.get("server-round", 0)),
        tensors=from_record(msg.content["arrays"]) if "arrays" in msg.content else {},
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        scope=str(config.get("scope", "local")),
        # simulation: Flower gives each virtual node its partition; a `fedprompt client` sets its own
        partition_id=int(context.node_config.get("partition-id", 0)),
        run=int(msg.metadata.run_id),
        lora_rank=int(config.get("lora-rank", 0)),
    )


def serve(request: Request, context: Context) -> Reply:
    """Answer `request`: in a `fedprompt client` with its handler; in a simulation worker with
    this process's LocalClient for the run's config."""
    if _IN_PROCESS is not None:  # deployment: this is the `fedprompt client` process
        return _IN_PROCESS(request)
    from fedprompt.client.handler import client_for, handle

    config_file = Path(str(context.run_config["output"])) / "config.yaml"
    num_partitions = int(context.node_config.get("num-partitions", 1))
    return handle(client_for(config_file, num_partitions), request)


def reply_message(msg: Message, reply: Reply) -> Message:
    """The Flower reply to `msg` carrying `reply`."""
    content = RecordDict({"metrics": MetricRecord(reply.metrics)})
    if reply.tensors is not None:
        content["arrays"] = to_record(reply.tensors)
    if reply.adapter_config is not None:
        content["adapter"] = ConfigRecord({"config": reply.adapter_config, "labels": json.dumps(reply.labels or [])})
    return Message(content=content, reply_to=msg)


def answer(msg: Message, context: Context) -> Message:
    return reply_message(msg, serve(request_of(msg, context), context))


@app.query()
def init(msg: Message, context: Context) -> Message:
    """The method's initial tensors (round 0's global state) and its adapter config."""
    return answer(msg, context)


def clipping_mod(msg: Message):
    """Client-level DP with client-side clipping: Flower's own mod that clips the update
    (local - global) to the norm the server's DP wrapper sent, before it leaves; else None."""
    config = msg.content.get("config", ConfigRecord())
    return fixedclipping_mod if KEY_CLIPPING_NORM in config else None


def claim_of(msg: Message, context: Context) -> float:
    """This client's claimed example count (its partition's size), asked before training."""
    return float(serve(dataclasses.replace(request_of(msg, context), kind=Kind.CLAIM), context).metrics[NUM_EXAMPLES])


@app.train()
def train(msg: Message, context: Context) -> Message:
    if secagg.is_secure(msg):  # a secure round's four messages: Flower's SecAgg+ mod around ours
        return secagg.secure_app(claim_of, answer)(msg, context)
    mod = clipping_mod(msg)
    return mod(msg, context, answer) if mod else answer(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return answer(msg, context)
