"""Empirical privacy audit of a finished run, on both attack surfaces. A measurement, not a
proof; DP's proof is the accountant.

What the released adapter leaks about one client's training data:

- Membership inference, loss threshold (Yeom et al., 2018): an example scores -loss under the
  final model; AUC of the audited client's training examples (members) against its own
  held-out examples (non-members, cut by the same partitioner, so the label skew is the same).
  0.5: the attacker learns nothing.
- Canary exposure (Carlini et al., 2019): `audit.canaries` random secrets, each a sentence with
  a random 6-digit code and a random label, planted `audit.canary_repeats` times in the audited
  client's training data. exposure = log2(R + 1) - log2(rank of the planted sentence's loss
  among R unplanted codes with the same label). A random rank gives ~1.4 bits on average; full
  memorisation gives log2(R + 1). On a generation task the canary is a prompt and its code the
  response, so the rank is by the model's likelihood of the secret digits.

What the server sees of every client's update (`audit.server_view`, classification):
label_leak.py, on a plain round and on a secure round.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from fedprompt.canaries import canaries
from fedprompt.config import Config


def auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P(score of a random member > that of a random non-member), ties counting half, where
    score = -loss (Mann-Whitney U / (n m))."""
    m, n = np.asarray(members, float), np.asarray(nonmembers, float)
    below = (n[None, :] > m[:, None]).sum() + 0.5 * (n[None, :] == m[:, None]).sum()  # member loss lower
    return float(below / (len(m) * len(n)))


def exposure(canary_loss: float, reference_losses: np.ndarray) -> float:
    """log2(R + 1) - log2(rank), rank 1 = the canary is the most likely of the R + 1 candidates."""
    rank = 1 + int((np.asarray(reference_losses) < canary_loss).sum())
    return math.log2(len(reference_losses) + 1) - math.log2(rank)


@torch.no_grad()
def example_losses(state, enc) -> np.ndarray:
    """(N,) each example's own loss under the model in `state` (a run.Setup)."""
    from fedprompt.tasks import collate

    state.model.eval()
    out, bs = [], state.cfg.train.eval_batch_size
    for i in range(0, len(enc), bs):
        batch = collate(enc, list(range(i, min(i + bs, len(enc)))), state.pad_id, state.backbone.device)
        out.append(state.task.example_losses(state.model(batch["input_ids"], batch["attention_mask"]), batch).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def canary_exposures(client, cfg: Config) -> list[float]:
    """Each planted canary's exposure under the model of `client` (a LocalClient): its
    sentence's loss (generation: the loss of its code, the response) ranked among the
    reference codes' (classification: under the canary's own label)."""
    from fedprompt.canaries import rows
    from fedprompt.data import with_rows

    s = client.state
    planted, refs = canaries(cfg, len(s.data.labels))
    empty = s.data.test.select([])
    out = []
    for code, label in planted:
        ds = with_rows(empty, rows([code, *refs], [label] * (len(refs) + 1), s.task.generative))
        losses = example_losses(s, s.task.encode(ds))
        out.append(exposure(float(losses[0]), losses[1:]))
    return out


def run_audit(cfg: Config, run_dir: str | Path, *, quiet: bool = False) -> dict:
    """Audit the adapter of `run_dir`: what its holder learns of client `audit.client`, and
    what the server learns of every client from one replayed round (classification:
    label_leak.py); writes audit.json."""
    from fedprompt import label_leak, payload
    from fedprompt.local import LocalClient
    from fedprompt.run import RunError, load_adapter
    from fedprompt.tasks import Encoded

    run_dir = Path(run_dir)
    if not (run_dir / "adapter").is_dir():
        raise RunError(f"{str(run_dir)!r} has no adapter/ folder; audit a finished run directory")
    a, n = cfg.audit, cfg.federation.num_clients
    with tempfile.TemporaryDirectory(prefix="fedprompt-audit-") as ledgers:  # a DP replay spends no real budget
        client = LocalClient(cfg, num_partitions=n, state_dir=ledgers)
        load_adapter(client.state.model, run_dir / "adapter")
        final = payload.extract(client.state.model)
        shard = client.shard(a.client)
        members = Encoded(shard.train.ids[: shard.members], shard.train.target[: shard.members])
        m_loss, n_loss = example_losses(client.state, members), example_losses(client.state, shard.test)
        result = {
            "client": a.client,
            "members": len(m_loss),
            "nonmembers": len(n_loss),
            "mia_auc": auc(m_loss, n_loss),
            "member_loss": float(m_loss.mean()),
            "nonmember_loss": float(n_loss.mean()),
            "canaries": a.canaries,
            "canary_repeats": a.canary_repeats,
            "references": a.references,
            "canary_exposure": None,
            "server_view": None,
        }
        if a.canaries:
            exps = canary_exposures(client, cfg)
            result.update(canary_exposure=float(np.mean(exps)), canary_exposure_max=float(np.max(exps)), exposure_ceiling=math.log2(a.references + 1))
        if a.server_view and not client.state.task.generative and not cfg.federation.lora_ranks:
            result["server_view"] = {**label_leak.server_view(client, final), "run_secure": cfg.federation.secure_aggregation}
    (run_dir / "audit.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not quiet:
        _print(result, run_dir)
    return result


def _print(result: dict, run_dir: Path) -> None:
    from fedprompt.report import summary

    lines = [("membership inference AUC", f"{result['mia_auc']:.3f} ({result['members']} members vs {result['nonmembers']} held out; 0.5 = no leak)")]
    if result["canary_exposure"] is not None:
        lines.append(
            (
                "canary exposure",
                f"{result['canary_exposure']:.2f} bits mean, {result['canary_exposure_max']:.2f} max (random ~1.4, ceiling {result['exposure_ceiling']:.1f})",
            )
        )
    v = result["server_view"]
    if v:
        mine = "secure" if v["run_secure"] else "plain"
        for name, what in (("plain", "each update"), ("secure", "the mean only"), ("no_update", "no update")):
            lines.append(
                (
                    f"server's label inference, {name.replace('_', ' ')}",
                    f"majority label of {v[name]['majority_hit']:.0%} of {v['clients']} clients, TV {v[name]['tv']:.2f} ({what})"
                    + (" <- what this run's server held" if name == mine else ""),
                )
            )
    lines.append(("written", str(run_dir / "audit.json")))
    summary(f"Privacy audit of {run_dir} (client {result['client']})", lines)
