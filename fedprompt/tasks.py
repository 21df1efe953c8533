"""What is learned: tokenization, loss and predictions for each task.

- head: an encoder's classification head on its pooled output (the head is in the payload).
- verbalizer: a causal LM's next-token logits of each label's word at the last real position.
- generation: supervised fine-tuning on prompt/response pairs, loss on response tokens only.
Token ids are cached on disk, keyed by the tokenizer, the task settings and the texts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from fedprompt.config import Config
from fedprompt.errors import UserError


class TaskError(UserError, ValueError):
    """A user-facing problem with the task setup (e.g. label words that are not one token)."""


@dataclass
class Encoded:
    """Token ids of a split, unpadded. `target`: class id per example, or per-token labels."""

    ids: list[list[int]]
    target: list[Any]
    prompt_len: list[int] = field(default_factory=list)  # generation: tokens before the response
    responses: list[str] = field(default_factory=list)  # generation: reference text

    def __len__(self) -> int:
        return len(self.ids)


def collate(enc: Encoded, index: list[int], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask (B, T) and labels ((B,) or (B, T))."""
    rows = [enc.ids[i] for i in index]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r)
        mask[j, : len(r)] = 1
    targets = [enc.target[i] for i in index]
    if isinstance(targets[0], list):
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for j, t in enumerate(targets):
            labels[j, : len(t)] = torch.tensor(t)
    else:
        labels = torch.tensor(targets, dtype=torch.long)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _cache_key(tokenizer, settings: dict, texts: list[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"tok": str(getattr(tokenizer, "name_or_path", "")), "n": len(tokenizer), **settings}, sort_keys=True).encode())
    for t in texts:
        h.update(t.encode("utf-8", "replace"))
        h.update(b"\0")
    return h.hexdigest()[:24]


def _cached(tokenizer, settings: dict, texts: list[str], build) -> Encoded:
    from fedprompt.backbone import cache_dir

    path = cache_dir() / "tokens" / f"{_cache_key(tokenizer, settings, texts)}.pt"
    if path.is_file():
        try:
            return Encoded(**torch.load(path, weights_only=True))
        except Exception:
            pass  # a corrupt cache entry is rebuilt, never trusted
    enc = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(enc.__dict__, tmp)
    os.replace(tmp, path)
    return enc


class Task:
    name = ""
    metric_names = ("accuracy", "macro_f1")
    # Evaluated by decoding (exact match) rather than by class predictions.
    generative = False

    # (C,) added to the class logits by a classification task's losses while `adjusted` is
    # active (a federated client's local training under train.logit_adjustment); evaluation
    # never sees it. LocalClient refuses the setting for a generative task.
    offset: torch.Tensor | None = None

    @contextlib.contextmanager
    def adjusted(self, offset: torch.Tensor | None) -> Iterator[None]:
        """Train with logits + `offset` (C,) in the losses; predictions keep the plain logits."""
        self.offset = offset
        try:
            yield
        finally:
            self.offset = None

    def encode(self, ds) -> Encoded:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def example_losses(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """(B,): each example's own loss, a function of that example alone."""
        raise NotImplementedError

    def example_mean_loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """The mean of `example_losses` (what DP-SGD's per-example gradients need)."""
        return self.example_losses(logits, batch).mean()


class HeadClassification(Task):
    """Encoder + classification head: logits (B, C) come straight from the model."""

    name = "head"

    def __init__(self, tokenizer, cfg: Config, labels: list[str]):
        self.tok, self.max_length, self.labels = tokenizer, cfg.model.max_length, labels

    def encode(self, ds) -> Encoded:
        texts, labels = list(ds["text"]), list(ds["label"])

        def build() -> Encoded:
            ids = self.tok(texts, truncation=True, max_length=self.max_length)["input_ids"]
            return Encoded(ids=[list(x) for x in ids], target=[int(y) for y in labels])

        enc = _cached(self.tok, {"task": self.name, "max_length": self.max_length, "labels": labels}, texts, build)
        return enc

    def class_logits(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return logits.float()

    def _loss_logits(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        z = self.class_logits(logits, batch)
        return z if self.offset is None else z + self.offset.to(z.device)

    def loss(self, logits, batch):
        return F.cross_entropy(self._loss_logits(logits, batch), batch["labels"])

    def example_losses(self, logits, batch):
        return F.cross_entropy(self._loss_logits(logits, batch), batch["labels"], reduction="none")

    def predict(self, logits, batch):
        return self.class_logits(logits, batch).argmax(-1)


def last_real_logits(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, P + T, V) -> (B, V) at each example's last real token; P prepended positions are
    inferred from the shapes (0 for prefix/LoRA, the prompt length for a soft prompt)."""
    prepended = logits.shape[1] - attention_mask.shape[1]
    last = attention_mask.sum(1) - 1 + prepended
    return logits[torch.arange(logits.shape[0], device=logits.device), last]


class VerbalizerClassification(HeadClassification):
    """Causal LM: the class score is the next-token logit of the label's word."""

    name = "verbalizer"

    def __init__(self, tokenizer, cfg: Config, labels: list[str]):
        super().__init__(tokenizer, cfg, labels)
        self.template = cfg.data.template
        words = cfg.data.label_words or [" " + lab for lab in labels]
        if len(words) != len(labels):
            raise TaskError(f"data.label_words: {len(words)} words for {len(labels)} labels {labels}; give one per label")
        ids = []
        for w in words:
            t = tokenizer(w, add_special_tokens=False)["input_ids"]
            if len(t) != 1:
                raise TaskError(
                    f"data.label_words: {w!r} is {len(t)} tokens for this tokenizer; each label word must be exactly "
                    "one token (try a leading space or a shorter word)"
                )
            ids.append(t[0])
        if len(set(ids)) != len(ids):
            raise TaskError(f"data.label_words: {words} map to repeated tokens; each label needs its own token")
        self.label_ids = torch.tensor(ids)

    def encode(self, ds) -> Encoded:
        texts, labels = list(ds["text"]), list(ds["label"])
        head, tail = self.template.split("{text}", 1)

        def build() -> Encoded:
            h = self.tok(head, add_special_tokens=False)["input_ids"] if head else []
            t = self.tok(tail, add_special_tokens=False)["input_ids"] if tail else []
            budget = max(self.max_length - len(h) - len(t), 1)
            # Truncate the article, never the template's tail: the label comes right after it.
            body = self.tok(texts, add_special_tokens=False)["input_ids"]
            ids = [h + list(b)[:budget] + t for b in body]
            return Encoded(ids=ids, target=[int(y) for y in labels])

        settings = {"task": self.name, "max_length": self.max_length, "template": self.template, "labels": labels}
        return _cached(self.tok, settings, texts, build)

    def class_logits(self, logits, batch):
        # (B, V): the model already projected only the last real position (Adapted.last_only).
        last = logits if logits.dim() == 2 else last_real_logits(logits, batch["attention_mask"])
        return last[:, self.label_ids.to(last.device)].float()


class Generation(Task):
    """SFT: next-token loss on the response tokens only; eval by loss and exact match."""

    name = "generation"
    metric_names = ("accuracy", "exact_match")
    generative = True

    def __init__(self, tokenizer, cfg: Config, labels: list[str]):
        self.tok, self.max_length = tokenizer, cfg.model.max_length
        self.max_new_tokens = 32
        self.eos = tokenizer.eos_token_id

    def encode(self, ds) -> Encoded:
        prompts, responses = list(ds["prompt"]), list(ds["response"])

        def build() -> Encoded:
            p_ids = self.tok(prompts, add_special_tokens=False)["input_ids"]
            r_ids = self.tok(responses, add_special_tokens=False)["input_ids"]
            ids, target, plen = [], [], []
            for p, r in zip(p_ids, r_ids):
                r = list(r)[: self.max_length // 2] + [self.eos]
                p = list(p)[-(self.max_length - len(r)) :] if len(p) + len(r) > self.max_length else list(p)
                ids.append(p + r)
                target.append([-100] * len(p) + r)
                plen.append(len(p))
            return Encoded(ids=ids, target=target, prompt_len=plen, responses=responses)

        return _cached(self.tok, {"task": self.name, "max_length": self.max_length}, prompts + ["\0"] + responses, build)

    def loss(self, logits, batch):
        labels = batch["labels"]
        logits = logits[:, logits.shape[1] - labels.shape[1] :]  # drop soft-prompt positions
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)

    def example_losses(self, logits, batch):
        # Each example's mean over its own response tokens (the batch's token mean would
        # weight an example by the others' lengths).
        labels = batch["labels"][:, 1:]
        logits = logits[:, logits.shape[1] - batch["labels"].shape[1] :][:, :-1]
        tok = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none")
        real = (labels != -100).float()
        return (tok.view_as(real) * real).sum(1) / real.sum(1).clamp(min=1)

    def predict(self, logits, batch):
        raise NotImplementedError("generation is scored by greedy decoding (engine.exact_match)")


TASKS = {"head": HeadClassification, "verbalizer": VerbalizerClassification, "generation": Generation}


def make_task(kind: str, tokenizer, cfg: Config, labels: list[str]) -> Task:
    return TASKS[kind](tokenizer, cfg, labels)


def task_kind(task: str, causal: bool) -> str:
    """data task + backbone kind -> one of TASKS."""
    if task == "generation":
        return "generation"
    return "verbalizer" if causal else "head"


def macro_f1(pred: torch.Tensor, gold: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over classes present in gold or predictions."""
    f1s = []
    for c in range(num_classes):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / max(len(f1s), 1)
