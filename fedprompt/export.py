"""The adapter a run hands over, usable elsewhere with plain transformers + peft.

A run's adapter/ folder holds adapter_config.json and adapter_model.safetensors (peft's own
format) and, written here: `base_model_name_or_path` set to the hub id of a built-in backbone
(not a path inside this machine's virtualenv), fedprompt.json (the labels in class-index order,
id2label, the task and the input length the adapter was trained with, the local backbone
path) and README.md, a model card (base model, method, data, federation, accuracy, epsilon).
No torch: the server writes it too.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedprompt.config import Config

# The hub ids of the built-in backbones (backbone.BUILTIN names their offline packages): what
# an adapter's user downloads. SmolLM2's offline copy is its Q4_1 GGUF file dequantized to fp32,
# whose weights differ slightly from the hub's: the model card says so.
HUB_IDS = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2", "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
NOTES = {"smollm2-135m": "trained on the Q4_1 GGUF release of this model, dequantized to fp32: expect small differences on the hub's fp32 weights"}
META = "fedprompt.json"


def make_portable(folder: Path, cfg: Config, labels: list[str], figures: dict) -> None:
    """Rewrite `folder`'s adapter_config.json for use elsewhere; write fedprompt.json and the
    model card. `figures`: the run's last metrics row plus `kind` (train or federated)."""
    folder = Path(folder)
    conf_path = folder / "adapter_config.json"
    conf = json.loads(conf_path.read_text(encoding="utf-8"))
    local = conf.get("base_model_name_or_path")
    base = HUB_IDS.get(cfg.model.name, cfg.model.name)
    conf["base_model_name_or_path"] = base
    conf_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    meta = {
        "base_model": base,
        "local_base_model": local,
        "method": cfg.peft.method,
        "task": conf.get("task_type"),
        "labels": list(labels),
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
        "max_length": cfg.model.max_length,
        "template": cfg.data.template if conf.get("task_type") == "CAUSAL_LM" and labels else None,
        "quantization": cfg.model.quantization,
    }
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(model_card(cfg, meta, figures), encoding="utf-8")


def model_card(cfg: Config, meta: dict, figures: dict) -> str:
    """A model card in the shape peft's save_pretrained writes (YAML front matter + sections)."""
    f, p = cfg.federation, cfg.privacy
    federated = figures.get("kind") == "federated"
    acc = figures.get("accuracy")
    lines = [
        "---",
        f"base_model: {meta['base_model']}",
        "library_name: peft",
        "tags:",
        "- fedprompt",
        f"- {cfg.peft.method}",
        *(["- federated-learning"] if federated else []),
        *(["- differential-privacy"] if p.mode != "none" else []),
        "---",
        "",
        f"# {cfg.peft.method} adapter for {meta['base_model']}",
        "",
        f"Trained with fedprompt ({'federated' if federated else 'centralized'}) on `{cfg.data.dataset}` "
        f"({cfg.data.task if cfg.data.task != 'auto' else meta['task']}).",
        "",
        "## Training",
        "",
        f"- method: {cfg.peft.method}"
        + (f", {cfg.peft.num_virtual_tokens} virtual tokens" if cfg.peft.method in ("prompt", "prefix") else f", rank {cfg.peft.lora_r}"),
        f"- backbone quantization while training: {cfg.model.quantization}; input length {cfg.model.max_length} tokens",
    ]
    if federated:
        lines.append(
            f"- federation: {f.num_clients} clients, {figures.get('round')} rounds x {cfg.round_steps} local steps, "
            f"strategy {f.strategy}, weighting {f.weighting}"
        )
    else:
        lines.append(f"- steps: {figures.get('step')}")
    if p.mode != "none" and figures.get("epsilon") is not None:
        lines.append(f"- differential privacy ({p.mode}): epsilon {figures['epsilon']:.3f} at delta {p.delta:g}")
    lines += ["", "## Results", "", f"- test accuracy: {acc:.4f}" if isinstance(acc, (int, float)) else "- test accuracy: not measured", ""]
    if cfg.model.name in NOTES:
        lines += [f"Note: {NOTES[cfg.model.name]}.", ""]
    if meta["labels"]:
        lines += ["## Labels", "", "Class index -> label (also in fedprompt.json, `id2label`):", ""]
        lines += [f"- {i}: {name}" for i, name in enumerate(meta["labels"])] + [""]
    lines += [
        "## Use",
        "",
        "```python",
        "import json",
        "from peft import PeftModel",
        "from transformers import AutoModelForSequenceClassification, AutoModelForCausalLM, AutoTokenizer",
        "",
        'meta = json.load(open("adapter/fedprompt.json"))',
        "tok = AutoTokenizer.from_pretrained(meta['base_model'])",
    ]
    if meta["task"] == "SEQ_CLS":
        lines += [
            "base = AutoModelForSequenceClassification.from_pretrained(",
            "    meta['base_model'], num_labels=len(meta['labels']), id2label={int(k): v for k, v in meta['id2label'].items()})",
            'model = PeftModel.from_pretrained(base, "adapter").eval()',
            "x = tok(text, truncation=True, max_length=meta['max_length'], return_tensors='pt')",
            "label = meta['id2label'][str(int(model(**x).logits.argmax(-1)))]",
        ]
    else:
        lines += ["base = AutoModelForCausalLM.from_pretrained(meta['base_model'])", 'model = PeftModel.from_pretrained(base, "adapter").eval()']
    lines += ["```", ""]
    return "\n".join(lines)


def read_meta(folder: Path) -> dict:
    """fedprompt.json of an adapter folder ({} when absent: an adapter from elsewhere)."""
    try:
        return json.loads((Path(folder) / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
