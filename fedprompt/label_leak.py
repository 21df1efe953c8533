"""What a curious server learns from the updates it receives: each client's label distribution.

The attack (a prediction-shift label inference, after Wainakh et al., "User-level label
leakage from gradients in federated learning", PoPETs 2022, adapted to a payload the server
can apply): the server puts the payload it received into the model and averages the updated
model's class probabilities over probe texts it holds. A client that trained on mostly
"sport" moves that average towards "sport". The probes here are the held-out test split,
standing in for public text of the domain that a real server could hold.

- A plain round: the server holds every client's payload, so it estimates each client's
  distribution on its own.
- A secure round (SecAgg+): the server holds only the weighted mean of the payloads
  (tests/test_secagg.py shows the unmasked sum is that mean up to quantization), so its
  estimate is one vector for every client.

The audit replays one round from the run's final global adapter: every client trains
`federation.local_steps` steps at the learning rate of round 2 (past the warmup), on a
throwaway privacy ledger. Scores over the clients:
- majority hit rate: estimate's argmax = the client's most frequent training label;
- TV: total-variation distance between estimate and the client's true label distribution.
A reference row scores the global adapter's own prediction (no update seen) the same way.
"""

from __future__ import annotations

import numpy as np
import torch

from fedprompt.errors import UserError

ROUND = 2  # the schedule's round the replay trains at: past a one-round warmup, near full LR


def label_distribution(targets: list[int], num_classes: int) -> np.ndarray:
    """(C,) the share of each class among `targets`."""
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes).astype(float)
    return counts / max(counts.sum(), 1.0)


def score(estimates: np.ndarray, truths: np.ndarray) -> dict[str, float]:
    """Attack success over K clients: estimates and truths are (K, C) distributions.
    majority_hit in [0, 1] (higher: more leaked), tv in [0, 1] (lower: more leaked)."""
    e, t = np.asarray(estimates, float), np.asarray(truths, float)
    return {"majority_hit": float(np.mean(e.argmax(1) == t.argmax(1))), "tv": float(np.mean(0.5 * np.abs(e - t).sum(1)))}


def weighted_mean(updates: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """The payload FedAvg forms from `updates` (what a secure round reveals), in float32."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = (w / w.sum()).tolist()
    return {k: sum(wi * u[k].float() for wi, u in zip(w, updates)).to(updates[0][k].dtype) for k in updates[0]}


@torch.no_grad()
def mean_prediction(state, tensors: dict[str, torch.Tensor], probes) -> np.ndarray:
    """(C,) the mean class probabilities of the model holding `tensors` over `probes`
    (an Encoded split); `state` is a run.Setup."""
    from fedprompt import payload
    from fedprompt.tasks import collate

    payload.load(state.model, tensors, source="the audit")
    state.model.eval()
    total, bs = None, state.cfg.train.eval_batch_size
    for i in range(0, len(probes), bs):
        batch = collate(probes, list(range(i, min(i + bs, len(probes)))), state.pad_id, state.backbone.device)
        p = torch.softmax(state.task.class_logits(state.model(batch["input_ids"], batch["attention_mask"]), batch), -1).sum(0).cpu().double()
        total = p if total is None else total + p
    return (total / len(probes)).numpy()


def server_view(client, global_tensors: dict[str, torch.Tensor], *, probes: int = 200) -> dict:
    """Replay one round from `global_tensors` for every partition of `client` (a LocalClient
    whose privacy ledgers are throwaway) and run the attack on what a plain and a secure round
    give the server. Classification only; leaves the last client's payload in the model."""
    from fedprompt.server.trust import cap_weights
    from fedprompt.tasks import Encoded

    s, f = client.state, client.cfg.federation
    num_classes = len(s.data.labels)
    n = min(probes, len(s.test))
    probe = Encoded(s.test.ids[:n], s.test.target[:n])
    fits, truths, refused = [], [], []
    for k in range(client.num_partitions):
        shard = client.shard(k)
        start = {name: t.clone() for name, t in global_tensors.items()}
        try:
            fits.append(client.fit(start, partition_id=k, round_num=min(ROUND, f.rounds), source="the audit"))
        except UserError:  # e.g. too few examples for DP-SGD: the real client refuses that round too
            refused.append(k)
            continue
        truths.append(label_distribution(shard.train.target[: shard.members], num_classes))
    if not fits:
        raise UserError(f"audit.server_view: no client could train a round of {client.cfg.federation.local_steps} steps; set audit.server_view=false")
    uniform = f.weighting != "examples"
    claims = {k: 1.0 if uniform else float(r.num_examples) for k, r in enumerate(fits)}
    weights, _ = cap_weights(claims, 0 if uniform else f.max_weight_factor)
    mean = weighted_mean([r.tensors for r in fits], [weights[k] for k in range(len(fits))])
    truth = np.stack(truths)
    plain = np.stack([mean_prediction(s, r.tensors, probe) for r in fits])
    secure = np.tile(mean_prediction(s, mean, probe), (len(fits), 1))
    before = np.tile(mean_prediction(s, global_tensors, probe), (len(fits), 1))
    return {
        "attack": "label distribution from the update's prediction shift",
        "clients": len(fits),
        "refused": refused,  # partitions whose replayed round was refused (they send nothing)
        "probes": n,
        "plain": score(plain, truth),
        "secure": score(secure, truth),
        "no_update": score(before, truth),
    }
