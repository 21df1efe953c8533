"""Differential privacy on the tiny parameter set. The only importer of opacus.

Sample-level DP-SGD (`privacy.mode: sample`), inside the DeepSpeed engine:
- Opacus's hooks compute the per-example gradient of every payload parameter (the trainable
  modules must be plain nn.Linear / nn.Embedding, whose per-example gradients Opacus computes
  exactly; anything else is refused);
- the optimizer DeepSpeed steps *is* an Opacus DPOptimizer around the torch AdamW: it clips
  each example's gradient to L2 norm C = `max_grad_norm`, sums, adds N(0, (sigma C)^2) noise and
  divides by the expected batch size;
- batches are Poisson-sampled (each example independently with probability q = batch/n; a
  step may draw nobody and still adds noise), which is what the accountant assumes;
- the accountant (RDP or PRV) is a `Ledger` on the client's disk: it survives rounds and
  restarts, and a client never trains past its target epsilon.

Noise and sampling draw from generators seeded from os.urandom, never from the config seed: a
noise that anyone holding the config can regenerate protects nothing. DP runs are therefore
not bit-reproducible.

Client-level DP (`privacy.mode: client`) is Flower's strategy wrappers (server/strategies.py),
accounted with `gaussian_epsilon` here (no sampling amplification claimed).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fedprompt.config import Config
from fedprompt.errors import UserError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # opacus warns at import about optional extras
    from opacus.accountants import PRVAccountant, RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

# Opacus's backward hooks sit on modules whose inputs (token positions) need no gradient;
# torch then warns on every step that the hook sees output gradients only, which is what it uses.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")

# Modules whose per-example gradient Opacus computes exactly with its own formulas.
EXACT = (nn.Linear, nn.Embedding)


class PrivacyError(UserError, ValueError):
    """A DP configuration whose guarantee would be false or unreachable; the message says why."""


# privacy.accountant -> Opacus's accountant class (Opacus keeps the same kind of registry).
ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}


def _accountant(kind: str):
    return ACCOUNTANTS[kind]()


def epsilon(history: list[tuple[float, float, int]], delta: float, kind: str = "rdp") -> float:
    """Epsilon at `delta` after the steps in `history`: (noise multiplier, sample rate, steps)."""
    if not history:
        return 0.0
    acc = _accountant(kind)
    acc.history = [tuple(h) for h in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha" and the like
        return float(acc.get_epsilon(delta=delta))


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon of `releases` Gaussian releases of sensitivity 1 and noise std
    `noise_multiplier`, without sampling amplification (client-level DP in Flower's wrappers)."""
    return epsilon([(noise_multiplier, 1.0, releases)], delta) if releases else 0.0


# --- sample-level DP-SGD -----------------------------------------------------------------------


def check_model(model: nn.Module) -> None:
    """Refuse a payload parameter that lives on a module whose per-example gradient Opacus
    cannot compute exactly (a raw nn.Parameter on a wrapper, a custom layer)."""
    bad = []
    for name, module in model.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own and type(module) not in EXACT:
            bad.append(f"{name or '<root>'} ({type(module).__name__}: {', '.join(own)})")
    if bad:
        raise PrivacyError(
            "privacy.mode 'sample': per-example gradients cannot be computed exactly for the trainable "
            f"parameters of {'; '.join(bad)}; only nn.Linear and nn.Embedding are supported"
        )


def sample_rate(cfg: Config, n: int) -> float:
    """q = batch_size / n: the probability that a step's Poisson sample includes an example."""
    if n < 2 * cfg.train.batch_size:
        raise PrivacyError(
            f"privacy.mode 'sample': {n} training examples are too few for train.batch_size "
            f"{cfg.train.batch_size} (sampling rate {cfg.train.batch_size / max(n, 1):.2f}); "
            f"DP-SGD needs at least 2 x batch_size examples per client: lower train.batch_size "
            f"or give each client more data"
        )
    return cfg.train.batch_size / n


def noise_multiplier(cfg: Config, *, q: float, steps: int) -> float:
    """sigma: `privacy.noise_multiplier`, or the smallest one that keeps `steps` steps at
    sampling rate q within `privacy.target_epsilon` at `privacy.delta`."""
    p = cfg.privacy
    if p.target_epsilon <= 0:
        return p.noise_multiplier
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sigma = get_noise_multiplier(
                target_epsilon=p.target_epsilon, target_delta=p.delta, sample_rate=q, steps=steps, accountant=p.accountant, epsilon_tolerance=0.01
            )
    except ValueError as e:
        raise PrivacyError(
            f"privacy.target_epsilon: {p.target_epsilon} cannot be met by {steps} steps at sampling "
            f"rate {q:.3f} and delta {p.delta:g} ({e}); raise the target, or plan fewer rounds or steps"
        ) from None
    if sigma > p.max_noise_multiplier:
        raise PrivacyError(
            f"privacy.target_epsilon: {p.target_epsilon} over {steps} steps at sampling rate {q:.3f} needs a "
            f"noise multiplier of {sigma:.1f}, above privacy.max_noise_multiplier ({p.max_noise_multiplier}): "
            f"the updates would be noise. Raise the target, plan fewer steps, or lower train.batch_size"
        )
    return sigma


@dataclass
class Ledger:
    """A client's privacy accountant, kept in a JSON file next to its data: every DP step it has
    taken, as (noise multiplier, sample rate, steps). Written atomically after every round."""

    path: Path | None
    accountant: str = "rdp"
    history: list[tuple[float, float, int]] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path | None, accountant: str = "rdp") -> "Ledger":
        if path is None or not Path(path).is_file():
            return cls(Path(path) if path else None, accountant)
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
            history = [(float(s), float(q), int(k)) for s, q, k in raw["history"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            # Never restart the count from zero on an unreadable ledger: that would understate epsilon.
            raise PrivacyError(
                f"privacy ledger {str(path)!r} is unreadable ({e}); restore it from a backup. Deleting it would under-report this client's privacy loss"
            ) from None
        return cls(Path(path), raw.get("accountant", accountant), history)

    def epsilon(self, delta: float) -> float:
        return epsilon(self.history, delta, self.accountant)

    @property
    def steps(self) -> int:
        return sum(k for _, _, k in self.history)

    def would_exceed(self, sigma: float, q: float, steps: int, *, target: float, delta: float) -> bool:
        return target > 0 and epsilon([*self.history, (sigma, q, steps)], delta, self.accountant) > target * 1.0001

    def record(self, sigma: float, q: float, steps: int) -> None:
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + steps)
        else:
            self.history.append((sigma, q, steps))
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"accountant": self.accountant, "history": self.history}) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)


def secure_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the OS entropy pool (64 bits), not from the config seed."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


def poisson_batches(n: int, q: float, seed: int | None = None) -> Iterator[list[int]]:
    """Endless Poisson samples of range(n): each example in each batch independently with
    probability q. Batch sizes vary; an empty batch is a valid (noise-only) step. `seed`: the
    ranks of a multi-rank client draw the same samples from rank 0's secret seed (None: a
    fresh one from the OS entropy pool)."""
    g = secure_generator() if seed is None else torch.Generator().manual_seed(seed)
    while True:
        yield torch.nonzero(torch.rand(n, generator=g) < q).flatten().tolist()


@dataclass
class SamplePlan:
    """What one client's DP-SGD round uses: sigma, q, and the expected batch size."""

    sigma: float
    q: float
    expected_batch: int


def plan(cfg: Config, *, n: int, planned_steps: int) -> SamplePlan:
    """Sigma and q for a client holding `n` training examples, sized for `planned_steps` DP
    steps in all (every round it could be sampled in)."""
    q = sample_rate(cfg, n)
    if cfg.privacy.delta >= 1 / n:
        raise PrivacyError(
            f"privacy.delta: {cfg.privacy.delta:g} is not below 1 / {n} (this client's examples): a delta "
            f"that large allows leaking an example outright; set it below {1 / n:.2g}"
        )
    return SamplePlan(noise_multiplier(cfg, q=q, steps=planned_steps), q, cfg.train.batch_size)


@contextlib.contextmanager
def per_example_gradients(model: nn.Module) -> Iterator[GradSampleModule]:
    """Opacus hooks on `model` for the duration: after each backward, every trainable
    parameter p carries p.grad_sample of shape (B, *p.shape). The hooks are removed on exit,
    so the same model serves non-private calls (evaluation, other clients) unchanged."""
    check_model(model)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    try:
        yield gsm
    finally:
        gsm._close()  # removes the hooks and the grad_sample attributes


def dp_optimizer(optimizer: torch.optim.Optimizer, cfg: Config, p: SamplePlan) -> DPOptimizer:
    """The optimizer DeepSpeed will step: Opacus clips, sums, noises and averages first.

    On N data-parallel ranks (a multi-rank client; every rank holds its slice of one Poisson
    sample) it is Opacus's DistributedDPOptimizer: each rank clips its own examples, rank 0
    alone adds the noise N(0, sigma^2 C^2), the sums are all-reduced, and each rank divides by
    its expected slice (expected batch / N) and by N: (sum of all clipped + one noise) /
    expected batch, what the accountant assumes of one rank."""
    from opacus.optimizers import DistributedDPOptimizer

    ranks = torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1
    return (DistributedDPOptimizer if ranks > 1 else DPOptimizer)(
        optimizer,
        noise_multiplier=p.sigma,
        max_grad_norm=cfg.privacy.max_grad_norm,
        expected_batch_size=p.expected_batch // ranks,  # config/checks.py: the ranks divide the batch
        loss_reduction="mean",
        generator=secure_generator(),
    )


def empty_step(model: nn.Module) -> None:
    """A Poisson sample that drew nobody: zero per-example gradients, so the step adds noise only."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


def clipped_norms(model: nn.Module) -> torch.Tensor:
    """Per-example L2 norms (B,) over all trainable parameters of the current grad_sample."""
    gs = [p.grad_sample for p in model.parameters() if p.requires_grad and getattr(p, "grad_sample", None) is not None]
    return torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in gs], dim=1).norm(2, dim=1)
