"""Task math with hand-computed values: verbalizer position, SFT masking, macro-F1, batching."""

from __future__ import annotations

import pytest
import torch

from fedprompt.tasks import Encoded, collate, last_real_logits, macro_f1


def test_macro_f1_hand_computed():
    gold = torch.tensor([0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0])
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp0 fp0 fn1 -> 0
    assert macro_f1(pred, gold, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert macro_f1(gold, gold, 3) == 1.0


def test_last_real_logits_accounts_for_padding_and_prepended_positions():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    p = 3  # a soft prompt of 3 positions before the 4 real/padded ones
    logits = torch.arange(2 * (p + 4) * 2, dtype=torch.float).view(2, p + 4, 2)
    out = last_real_logits(logits, mask)
    assert torch.equal(out[0], logits[0, p + 2]) and torch.equal(out[1], logits[1, p + 0])
    assert torch.equal(last_real_logits(logits[:, p:], mask)[0], logits[0, p + 2])  # nothing prepended


def test_collate_right_pads_and_masks():
    enc = Encoded(ids=[[5, 6, 7], [8]], target=[1, 0])
    b = collate(enc, [0, 1], pad_id=0, device=torch.device("cpu"))
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [1, 0]


def test_generation_loss_only_on_response_tokens():
    from types import SimpleNamespace

    from fedprompt.tasks import Generation

    tok = SimpleNamespace(eos_token_id=9)
    cfg = SimpleNamespace(model=SimpleNamespace(max_length=16))
    task = Generation(tok, cfg, [])
    enc = Encoded(ids=[[1, 2, 3, 4]], target=[[-100, -100, 3, 4]])
    batch = collate(enc, [0], pad_id=0, device=torch.device("cpu"))
    logits = torch.zeros(1, 4, 10, requires_grad=True)
    task.loss(logits, batch).backward()
    # Position t predicts token t+1: only positions 1 and 2 (predicting 3 and 4) get gradient.
    touched = (logits.grad.abs().sum(-1) > 0)[0].tolist()
    assert touched == [False, True, True, False]


def test_verbalizer_truncates_the_text_never_the_template_tail():
    import transformers
    from datasets import Dataset

    from fedprompt.backbone import resolve
    from fedprompt.config import load_config
    from fedprompt.tasks import TaskError, VerbalizerClassification

    tok = transformers.AutoTokenizer.from_pretrained(resolve("smollm2-135m"))
    cfg = load_config(None, ["model.max_length=16", "data.template=Article: {text}\nTopic:"])
    task = VerbalizerClassification(tok, cfg, ["business", "sport"])
    ds = Dataset.from_dict({"text": ["word " * 100, "short"], "label": [0, 1]})
    enc = task.encode(ds)
    tail = tok("\nTopic:", add_special_tokens=False)["input_ids"]
    head = tok("Article: ", add_special_tokens=False)["input_ids"]
    assert len(enc.ids[0]) == 16 and enc.ids[0][-len(tail) :] == tail and enc.ids[0][: len(head)] == head
    assert enc.ids[1][-len(tail) :] == tail
    assert task.label_ids.tolist() == [tok(" business", add_special_tokens=False)["input_ids"][0], tok(" sport", add_special_tokens=False)["input_ids"][0]]
    bad = load_config(None, ["data.label_words=[' business news', ' sport']"])
    with pytest.raises(TaskError, match="exactly one token"):
        VerbalizerClassification(tok, bad, ["business", "sport"])


def test_exact_match_stops_decoding_once_the_reference_is_out_of_reach():
    """Greedy exact match gives the full decode's answer, but stops as soon as the output is no
    longer a prefix of the reference (a one-word answer costs ~2 forwards, not max_new_tokens)."""
    import transformers

    from fedprompt.engine import exact_match
    from fedprompt.tasks import Encoded
    from tests.tiny import tiny_folder

    tok = transformers.AutoTokenizer.from_pretrained(tiny_folder("llama"))

    class Scripted(torch.nn.Module):
        """Emits `script` token by token (then EOS), counting its forwards."""

        def __init__(self, script: list[int]):
            super().__init__()
            self.script, self.calls, self.start = script, 0, None

        def forward(self, x, mask):
            self.calls += 1
            self.start = x.shape[1] if self.start is None else self.start
            k = x.shape[1] - self.start
            logits = torch.zeros(1, x.shape[1], len(tok))
            logits[0, -1, self.script[k] if k < len(self.script) else tok.eos_token_id] = 1.0
            return logits

    class Task:
        max_new_tokens, eos = 32, tok.eos_token_id

    Task.tok = tok
    data = Encoded(ids=[tok("Topic:")["input_ids"]], target=[None], prompt_len=[len(tok("Topic:")["input_ids"])], responses=[" business"])
    right = Scripted(tok(" business")["input_ids"])
    assert exact_match(right, Task, data, 1, torch.device("cpu")) == 1.0
    assert right.calls == len(tok(" business")["input_ids"]) + 1  # the tokens, then EOS
    babble = Scripted(tok(" sport and then a great deal more text")["input_ids"])
    assert exact_match(babble, Task, data, 1, torch.device("cpu")) == 0.0
    assert babble.calls == 1  # " sport" is no prefix of "business": stop at once
    longer = Scripted(tok(" business news")["input_ids"])
    assert exact_match(longer, Task, data, 1, torch.device("cpu")) == 0.0  # the reference, then more


def test_logit_adjustment_shifts_the_training_loss_only_and_drops_absent_classes():
    import torch.nn.functional as F

    from fedprompt.config import load_config
    from fedprompt.tasks import HeadClassification

    task = HeadClassification(None, load_config(None, []), ["a", "b", "c"])
    z = torch.tensor([[1.0, 2.0, 0.5], [0.2, 0.1, 3.0]], requires_grad=True)
    batch = {"labels": torch.tensor([0, 1])}
    prior = torch.tensor([0.75, 0.25, 0.0])  # the client never holds class c
    offset = torch.log(prior.clamp_min(1e-12))
    plain = task.loss(z, batch)
    with task.adjusted(offset):
        adjusted = task.loss(z, batch)
        assert torch.equal(task.predict(z, batch), z.argmax(-1))  # predictions: the plain logits
        (g,) = torch.autograd.grad(adjusted, z)
    assert float(adjusted.detach()) == pytest.approx(float(F.cross_entropy(z + offset, batch["labels"]).detach()))
    assert abs(float(g[:, 2].abs().max())) < 1e-9  # class c is no longer pushed down on this client
    (g0,) = torch.autograd.grad(task.loss(z, batch), z)
    assert float(g0[:, 2].abs().max()) > 0.1 and float(task.loss(z, batch).detach()) == float(plain.detach())  # off again outside the block


@pytest.mark.parametrize(
    "sets,words",
    [
        (["train.logit_adjustment=-1"], "must be >= 0"),
        (["train.logit_adjustment=1", "privacy.mode=sample"], "each example's gradient would depend on the others'"),
    ],
)
def test_logit_adjustment_refusals(sets, words):
    from fedprompt.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=words):
        load_config(None, sets)
