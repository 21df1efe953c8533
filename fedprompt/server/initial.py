"""Round 0: where the global tensors, and with them the wire contract, come from.

Never from one client: a client's initial payload is untrusted input, and the manifest taken
from it is what every later reply is checked against (one liar could otherwise make every
honest client's reply "wrong", or choose round 0's tensors). Either a trusted adapter file
(`federation.initial_adapter`), or the seeded initial payload that a strict majority of
`federation.init_quorum` clients agree on (honest clients seed it identically, so their
digests are equal). The server cannot derive the payload itself: that needs the backbone
and torch, which the server never loads.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedprompt import checkpoint, payload
from fedprompt.config import Config
from fedprompt.lora_aggregation import lora_aggregation, split_fixed
from fedprompt.protocol import Kind
from fedprompt.server.aggregate import log
from fedprompt.server.messages import FederationError, exchange, message, wait_for_nodes
from fedprompt.server.trust import NoAgreement, Patience, agree
from fedprompt.wire import error_reason, from_record

MAX_ADAPTER_CONFIG = 64 * 1024  # bytes of adapter_config.json text a client may send (peft's is ~1 KB)
MAX_LABELS, MAX_LABEL = 100_000, 1000  # label names a client may send, characters in each
LOCAL_KEYS = ("base_model_name_or_path", "revision")  # differ between honest clients' machines


def initial_state(grid: Grid, cfg: Config, patience: Patience) -> checkpoint.ServerState:
    """Round 0's state: from federation.initial_adapter, or agreed by a quorum of clients."""
    f = cfg.federation
    if f.initial_adapter:
        from fedprompt.export import read_meta

        tensors, adapter_config = read_adapter(Path(f.initial_adapter))
        labels = [str(x) for x in read_meta(Path(f.initial_adapter)).get("labels", [])]
        log(f"initial payload from federation.initial_adapter {f.initial_adapter}: {len(tensors)} tensors, digest {payload.digest(tensors)}")
    else:
        tensors, adapter_config, labels = _quorum(grid, cfg, patience)
    tensors, fixed = split_fixed(tensors, lora_aggregation(cfg.peft.method, f.lora_aggregation).fixed)
    if fixed:
        log(f"federation.lora_aggregation {f.lora_aggregation}: {len(fixed)} tensors stay at their initial values, {len(tensors)} are exchanged")
    return checkpoint.ServerState(round=0, tensors=tensors, adapter_config=adapter_config, config_yaml=cfg.to_yaml(), labels=labels, fixed=fixed)


def read_adapter(folder: Path) -> tuple[dict, str]:
    """(tensors, adapter_config.json text) of a PEFT adapter folder, checked: float32, finite."""
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        text = (folder / "adapter_config.json").read_text(encoding="utf-8")
        json.loads(text)
    except (OSError, ValueError, TypeError) as e:  # safetensors' own errors are ValueError/TypeError kinds
        raise FederationError(f"federation.initial_adapter {folder}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    payload.validate(tensors, payload.manifest_from(tensors), source=f"federation.initial_adapter {folder}")
    bad = sorted(k for k, v in tensors.items() if v.dtype.kind == "f" and v.dtype.name != "float32")
    if bad:
        raise FederationError(f"federation.initial_adapter {folder}: tensor {bad[0]!r} is {tensors[bad[0]].dtype.name}; the payload travels as float32")
    return tensors, text


def _quorum(grid: Grid, cfg: Config, patience: Patience) -> tuple[dict, str, list[str]]:
    f = cfg.federation
    nodes = wait_for_nodes(grid, max(f.min_clients, 1))
    asked = sorted(random.SystemRandom().sample(nodes, min(f.init_quorum, len(nodes))))  # a liar cannot place itself first
    ask = {"server-round": 0}
    if cfg.peft.method == "lora":  # clients of any rank answer the seeded adapter at the global's rank
        ask["lora-rank"] = cfg.peft.lora_r
    msgs = [message(n, Kind.INIT, RecordDict({"config": ConfigRecord(ask)})) for n in asked]
    replies = exchange(grid, msgs, patience.timeout(Kind.INIT))
    answers: dict[int, str] = {}
    got: dict[int, tuple[dict, str, list[str]]] = {}
    for rep in replies:
        node = rep.metadata.src_node_id
        try:
            tensors, text, labels = _initial_of(rep)
        except (payload.PayloadError, ValueError, KeyError, TypeError) as e:
            log(f"initial payload of node {node} not usable: {e}")
            continue
        answers[node] = f"{payload.digest(tensors)}/{_config_fingerprint(text, labels)}"
        got[node] = (tensors, text, labels)
    try:
        agreed, ayes, others = agree(answers)
    except NoAgreement as e:
        raise FederationError(
            f"the clients' initial payloads do not agree ({e}); asked {len(asked)} of {len(nodes)} connected clients. "
            "Start more honest clients (federation.init_quorum of them, a strict majority agreeing) "
            "or set federation.initial_adapter to a trusted adapter folder"
        ) from None
    for node in others:
        log(
            f"node {node} answered a different initial payload ({answers[node]}, the majority's is {agreed}): not used; "
            "that client is not running this federation's seeded method"
        )
    tensors, text, labels = got[ayes[0]]
    single = " (one client: set federation.init_quorum and min_clients >= 3, or federation.initial_adapter, not to rely on one)" if len(ayes) == 1 else ""
    log(
        f"initial payload {agreed.split('/')[0]} agreed by node(s) {', '.join(map(str, ayes))}{single}: "
        f"{len(tensors)} tensors, {sum(v.nbytes for v in tensors.values()):,} bytes"
    )
    return tensors, text, labels


def _initial_of(rep) -> tuple[dict, str, list[str]]:
    if rep.has_error():
        raise ValueError(f"it failed the request: {error_reason(rep)}")
    tensors = from_record(rep.content["arrays"])
    payload.validate(tensors, payload.manifest_from(tensors), source="its initial payload")
    text = str(rep.content["adapter"]["config"])
    if len(text.encode()) > MAX_ADAPTER_CONFIG:
        raise ValueError(f"its adapter config is {len(text.encode()):,} bytes, over {MAX_ADAPTER_CONFIG:,}")
    if not isinstance(json.loads(text), dict):
        raise ValueError("its adapter config is not a JSON object")
    labels = json.loads(str(rep.content["adapter"].get("labels", "[]")))
    if not (isinstance(labels, list) and len(labels) <= MAX_LABELS and all(isinstance(x, str) and len(x) <= MAX_LABEL for x in labels)):
        raise ValueError(f"its labels are not a list of at most {MAX_LABELS:,} names of at most {MAX_LABEL} characters")
    return tensors, text, labels


def _config_fingerprint(text: str, labels: list[str]) -> str:
    """The adapter config's and labels' hash, without the keys that name paths on the client's
    machine."""
    d = {k: v for k, v in json.loads(text).items() if k not in LOCAL_KEYS}
    return hashlib.sha256(json.dumps([d, labels], sort_keys=True).encode()).hexdigest()[:8]
