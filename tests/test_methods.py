"""Methods and the payload contract: what is trainable, what is exported, what is refused."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from fedprompt import payload
from fedprompt.payload import PayloadError
from fedprompt.run import setup
from tests.tiny import tiny_config

CASES = [(k, m) for k in ("bert", "llama") for m in ("prompt", "prefix", "lora")]


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(kind, method, quantization="none"):
        key = (kind, method, quantization)
        if key not in cache:
            cache[key] = setup(tiny_config(kind, method, quantization))
        return cache[key]

    return get


@pytest.mark.parametrize("kind,method", CASES)
def test_only_payload_is_trainable(built, kind, method):
    s = built(kind, method)
    trainable = {id(p) for p in s.model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in s.model.trainable().values()}
    # Every backbone weight is frozen (the head, when there is one, is payload, not backbone).
    payload_ids = {id(p) for p in s.model.trainable().values()}
    frozen = [n for n, p in s.model.backbone.named_parameters() if id(p) not in payload_ids]
    assert frozen and all(not p.requires_grad for n, p in s.model.backbone.named_parameters() if id(p) not in payload_ids)


@pytest.mark.parametrize("kind,method", CASES)
def test_payload_names_are_the_adapter_file(built, kind, method, tmp_path):
    """The payload is exactly the tensor set of the exported PEFT adapter file."""
    s = built(kind, method)
    s.model.save_adapter(tmp_path, s.backbone.path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors = payload.extract(s.model)
    assert set(saved) == set(tensors)
    for k in saved:
        assert torch.equal(saved[k], tensors[k]), k
    if method != "prompt":  # peft-backed methods: our names are peft's own state-dict keys
        assert set(get_peft_model_state_dict(s.model.peft_model)) == set(tensors)


@pytest.mark.parametrize("kind,method", CASES)
def test_round_trip_and_refusals(built, kind, method):
    s = built(kind, method)
    manifest = payload.manifest_of(s.model)
    before = payload.extract(s.model)
    torch.manual_seed(1)
    new = {k: torch.randn_like(v) for k, v in before.items()}
    payload.load(s.model, new, source="client 7")
    after = payload.extract(s.model)
    assert all(torch.equal(after[k], new[k]) for k in new)
    assert payload.raw_bytes(manifest) == sum(t.numel() * t.element_size() for t in new.values())

    name = manifest[0].name
    with pytest.raises(PayloadError, match=rf"client 7.*{name!r}.*shape"):
        payload.load(s.model, {**new, name: torch.zeros(3)}, source="client 7")
    with pytest.raises(PayloadError, match=rf"client 7.*{name!r}.*dtype"):
        payload.load(s.model, {**new, name: new[name].double()}, source="client 7")
    with pytest.raises(PayloadError, match=r"client 7.*unexpected tensor 'bogus'"):
        payload.load(s.model, {**new, "bogus": torch.zeros(1)}, source="client 7")
    with pytest.raises(PayloadError, match=rf"client 7.*missing tensor {name!r}"):
        payload.load(s.model, {k: v for k, v in new.items() if k != name}, source="client 7")
    bad = new[name].clone()
    bad.view(-1)[0] = float("nan")
    with pytest.raises(PayloadError, match=rf"{name!r}.*NaN"):
        payload.load(s.model, {**new, name: bad}, source="client 7")
    # A refused payload changed nothing.
    assert all(torch.equal(payload.extract(s.model)[k], new[k]) for k in new)


@pytest.mark.parametrize("kind,method", CASES)
def test_adapter_changes_the_output(built, kind, method):
    """Guards against vacuous tests: perturbing the method's own tensors (not the head) must
    change the logits; so must perturbing the head when there is one."""
    s = built(kind, method)
    batch = {"input_ids": torch.tensor([s.train.ids[0][:16]]), "attention_mask": torch.ones(1, 16, dtype=torch.long)}
    s.model.eval()
    saved = payload.extract(s.model)
    head = {k for k in saved if ".classifier." in k or ".score." in k}
    groups = [set(saved) - head] + ([head] if head else [])
    with torch.no_grad():
        a = s.model(**batch)
        for group in groups:
            assert group
            # Random, not constant: a constant shift vanishes in BERT's embedding LayerNorm.
            g = torch.Generator().manual_seed(0)
            payload.load(s.model, {k: v + 0.5 * torch.randn(v.shape, generator=g) if k in group else v for k, v in saved.items()}, source="test")
            b = s.model(**batch)
            payload.load(s.model, saved, source="test")
            assert not torch.allclose(a, b), sorted(group)[:3]


@pytest.mark.parametrize("init", ["text", "vocab", "random"])
def test_prompt_init_modes(init):
    s = setup(tiny_config("llama", "prompt", peft__prompt_init=init, peft__prompt_init_text="Classify this news article"))
    vocab = s.model.backbone.get_input_embeddings().weight
    w = s.model.prompt.weight.detach()
    if init in ("text", "vocab"):  # every virtual token starts as a real token's embedding
        assert all(bool(((vocab - row).abs().sum(1) == 0).any()) for row in w)
    else:  # random, at the scale of the word embeddings
        assert abs(float(w.std()) - float(vocab.std())) < 0.2 * float(vocab.std())


@pytest.mark.parametrize("method", ["prompt", "prefix", "lora"])
def test_last_only_projection_equals_full_logits_at_the_last_real_token(built, method):
    """The verbalizer's fast path (LM head at the last real token only) changes no number."""
    s = built("llama", method)
    assert s.model.last_only  # setup turned it on for the verbalizer task
    from fedprompt.tasks import Encoded, collate

    ids = [s.test.ids[0][:20], s.test.ids[1][:32], s.test.ids[2][:11]]  # unequal: right padding in play
    batch = collate(Encoded(ids=ids, target=[0, 1, 2]), [0, 1, 2], s.pad_id, s.backbone.device)
    assert int(batch["attention_mask"].sum(1).min()) < batch["attention_mask"].shape[1]
    s.model.eval()
    with torch.no_grad():
        fast = s.task.class_logits(s.model(batch["input_ids"], batch["attention_mask"]), batch)
        s.model.last_only = False
        try:
            full_logits = s.model(batch["input_ids"], batch["attention_mask"])
        finally:
            s.model.last_only = True
        full = s.task.class_logits(full_logits, batch)
    assert full_logits.dim() == 3
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
