"""Backbones: frozen, quantized, and still trainable after an evaluation (the bnb CPU trap)."""

from __future__ import annotations

import pytest
import torch

from fedprompt.backbone import BackboneError, load_backbone, resolve
from fedprompt.config import ModelConfig
from fedprompt.run import setup
from fedprompt.tasks import collate
from tests.tiny import tiny_config


def _grad(s) -> dict[str, torch.Tensor]:
    """Gradient of the training loss w.r.t. every payload tensor on a fixed batch."""
    s.model.train()
    for p in s.model.trainable().values():
        p.grad = None
    batch = collate(s.train, list(range(4)), s.pad_id, s.backbone.device)
    torch.manual_seed(0)  # same dropout masks in both passes
    s.task.loss(s.model(batch["input_ids"], batch["attention_mask"]), batch).backward()
    return {k: p.grad.detach().clone() for k, p in s.model.trainable().items()}


@pytest.mark.parametrize("quantization", ["none", "8bit", "4bit"])
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_gradient_after_evaluation_equals_gradient_without(kind, quantization):
    """bitsandbytes 0.50 on CPU: a 4-bit layer run in eval mode without grad can repack itself into an
    inference-only layout, zeroing gradients afterwards. Rounds alternate eval and train."""
    s = setup(tiny_config(kind, "prompt", quantization))
    if quantization == "4bit":
        import bitsandbytes as bnb

        layers = [m for m in s.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    if quantization == "8bit":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in s.model.modules())
    before = _grad(s)
    s.model.eval()
    with torch.no_grad():
        batch = collate(s.test, list(range(8)), s.pad_id, s.backbone.device)
        s.model(batch["input_ids"], batch["attention_mask"])
    after = _grad(s)
    for k in before:
        assert before[k].norm() > 0, f"{k}: zero gradient before any evaluation"
        torch.testing.assert_close(after[k], before[k], rtol=1e-5, atol=1e-7, msg=k)


def test_real_backbone_is_frozen_and_training_leaves_it_untouched():
    from fedprompt.engine import batches, make_engine, train_steps

    cfg = tiny_config("bert", "prompt", model__name="minilm-l6", train__local_steps=2)
    s = setup(cfg)
    head = {id(p) for p in s.model.trainable().values()}
    frozen = {n: p.detach().clone() for n, p in s.model.backbone.named_parameters() if id(p) not in head}
    assert len(frozen) > 90 and all(not p.requires_grad for n, p in s.model.backbone.named_parameters() if n in frozen)
    prompt_before = s.model.prompt.weight.detach().clone()
    engine = make_engine(s.model, cfg, 2)
    train_steps(engine, s.task, s.train, cfg, steps=2, stream=batches(len(s.train), cfg.train.batch_size, 0), pad_id=s.pad_id, device=s.backbone.device)
    after = dict(s.model.backbone.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert not torch.equal(s.model.prompt.weight, prompt_before)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(BackboneError, match=r"unknown model 'no-such-model'.*minilm-l6"):
        load_backbone(ModelConfig(name="no-such-model"), num_labels=2)


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match="no config.json"):
        resolve(str(tmp_path))


def test_builtin_names_resolve_offline():
    assert resolve("minilm-l6").endswith("model")
    assert torch.__version__ and resolve("smollm2-135m")


def test_soft_prompt_refused_on_a_decoder_sequence_classifier(tmp_path):
    """Given inputs_embeds, decoder classifiers pool the last position (padding under right
    padding), so a soft prompt would silently read the wrong token: refused with a reason."""
    import json
    import shutil

    from fedprompt import methods
    from fedprompt.config import PeftConfig
    from tests.tiny import tiny_folder

    folder = tmp_path / "llama-cls"
    shutil.copytree(tiny_folder("llama"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["LlamaForSequenceClassification"]
    (folder / "config.json").write_text(json.dumps(cfg))
    bb = load_backbone(ModelConfig(name=str(folder)), num_labels=3)
    assert not bb.causal and bb.model.config.pad_token_id is not None
    with pytest.raises(BackboneError, match="not supported on LlamaForSequenceClassification.*prefix or lora"):
        methods.build(bb, PeftConfig(method="prompt"), num_labels=3)


def test_checkpoint_missing_non_head_weights_is_refused(tmp_path):
    """A BERT saved without its pooler would get a random, frozen, unexported pooler: no
    adapter could reproduce the run, so loading it is refused with the missing names."""
    import transformers

    from tests.tiny import tiny_folder

    src = tiny_folder("bert")
    model = transformers.BertModel(transformers.BertConfig.from_pretrained(src), add_pooling_layer=False)
    model.config.architectures = ["BertModel"]
    model.save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(tmp_path)
    with pytest.raises(BackboneError, match=r"lacks 2 weights.*pooler"):
        load_backbone(ModelConfig(name=str(tmp_path)), num_labels=2)
