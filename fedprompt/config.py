"""Typed configuration: YAML + `--set` overrides, validated once at load.

Every error names the field, the bad value and what is allowed; all errors of a file are
collected and reported together (one `ConfigError` whose lines are printed by the CLI).
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A user error in a config file or override. Each entry of `problems` is one line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class ModelConfig:
    name: str = "minilm-l6"  # built-in name (minilm-l6, smollm2-135m), local HF folder or hub id
    quantization: Literal["none", "8bit", "4bit"] = "none"
    quant_type: Literal["nf4", "fp4"] = "nf4"  # 4bit only
    double_quant: bool = False  # 4bit only
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_length: int = 128  # tokens of real text per example (virtual tokens come on top)


@dataclass
class PeftConfig:
    method: Literal["prompt", "prefix", "lora"] = "prompt"
    num_virtual_tokens: int = 10  # prompt, prefix
    prompt_init: Literal["random", "text", "vocab"] = "random"  # prompt only
    prompt_init_text: str = ""  # prompt_init == text
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["auto"])


@dataclass
class DataConfig:
    dataset: str = "bbc"  # bbc | tweets | file
    task: Literal["auto", "classification", "generation"] = "auto"
    path: str = ""  # user file (.csv, .jsonl, .json, .parquet) when dataset == file
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    labels: list[str] = field(default_factory=list)  # label set; empty: sorted labels found
    label_words: list[str] = field(default_factory=list)  # causal LM verbalizer; empty: labels
    template: str = "{text}\nTopic:"  # causal LM classification input; {text} is the example
    test_fraction: float = 0.2
    max_examples: int = 0  # 0: all; else a stratified subsample (before the split)
    min_confidence: float = 0.8  # tweets: crowd confidence threshold
    partition: Literal["iid", "dirichlet", "quantity"] = "iid"
    alpha: float = 0.5  # dirichlet concentration (smaller: more label skew)
    quantity_sigma: float = 1.0  # quantity skew (log-normal sigma of partition sizes)
    seed: int = 42


@dataclass
class TrainConfig:
    local_steps: int = 200  # optimizer steps of `fedprompt train` (federated: federation.local_steps)
    batch_size: int = 16
    lr: float = 3e-2
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd: with momentum; steadier under DP noise
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    eval_every: int = 50  # steps; 0: only at the start and the end
    eval_batch_size: int = 64
    max_eval_examples: int = 0  # 0: the whole test split
    seed: int = 0


@dataclass
class FederationConfig:
    num_clients: int = 8  # simulation: virtual clients (= data partitions)
    rounds: int = 10
    local_steps: int = 0  # optimizer steps per sampled client per round; 0: train.local_steps
    fraction_fit: float = 1.0  # share of connected clients sampled to train each round
    fraction_evaluate: float = 1.0  # share sampled to evaluate on their local test split; 0: off
    centralized_eval: bool = True  # simulation: also evaluate on the whole held-out test split
    min_clients: int = 2  # the server waits for this many connected clients before a round
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "trimmedmean", "krum", "multikrum"] = "fedavg"
    proximal_mu: float = 0.0  # fedprox: weight of the proximal term mu/2 ||w - w_global||^2
    server_lr: float = 1e-2  # fedadam / fedyogi: server learning rate (eta)
    trim_fraction: float = 0.2  # trimmedmean: share cut from each end, per coordinate
    num_malicious: int = 0  # krum / multikrum: f, attackers tolerated per round (needs > 2f + 2 sampled clients)
    norm_bound: float = 0.0  # L2 bound on each client's update (reply - global), scaled down to it; 0: off
    reject_norm_factor: float = 10.0  # reject an update longer than this x the round's median update norm; 0: off
    round_timeout: float = 0.0  # seconds to wait for replies in a round; 0: no limit
    workers: int = 1  # simulation: worker processes, each holding one backbone


@dataclass
class PrivacyConfig:
    mode: Literal["none", "sample", "client", "both"] = "none"  # both: sample- and client-level at once
    # Sample level: DP-SGD on each client (Opacus), per example.
    noise_multiplier: float = 1.0  # std of the noise / L2 sensitivity
    max_grad_norm: float = 1.0  # L2 clipping bound C of one example's gradient
    target_epsilon: float = 0.0  # > 0: solve the noise multiplier for it over the planned rounds and steps
    delta: float = 1e-5
    accountant: Literal["rdp", "prv"] = "rdp"
    max_noise_multiplier: float = 20.0  # refuse a target epsilon that would need more noise than this
    # Client level: Flower's DP strategy wrappers, per client update (central DP at the server).
    client_noise_multiplier: float = 1.0  # std of the noise on the summed clipped updates / clip norm
    client_clip_norm: float = 0.1  # L2 bound on one client's update (local - global)
    clipping: Literal["server", "client"] = "server"  # where updates are clipped
    # Refused when true under client-level DP: Flower 1.41's adaptive wrappers under-noise
    # (config check below says why). Kept as a key so the reason is given, not "unknown key".
    adaptive_clipping: bool = False


@dataclass
class AuditConfig:
    """Empirical privacy audit (fedprompt audit; after every simulation with privacy on)."""

    client: int = 0  # the audited client (partition id): its training examples are the members
    canaries: int = 0  # random secrets planted in that client's training data (classification)
    canary_repeats: int = 4  # copies of each canary in the training data
    references: int = 255  # unplanted candidate secrets each canary is ranked against


@dataclass
class AttackConfig:
    """Poisoned clients, to measure robust aggregation: `fedprompt simulate` only (`fedprompt
    client` and `server` refuse attack.clients > 0)."""

    clients: int = 0  # attacking partitions: the last `clients` of federation.num_clients
    kind: Literal["scale"] = "scale"  # scale: reply global + scale x (the honest local update)
    scale: float = -10.0


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 1.0  # 0: off


@dataclass
class ServerConfig:
    address: str = "0.0.0.0:9092"
    # TLS + client authentication (`fedprompt certs`): ca.crt, server.crt, server.key and
    # authorized/<client>.pub. Required unless `fedprompt server --insecure`.
    certs_dir: str = ""
    # What faces the network on `address`. builtin: fedprompt's own front, which forwards only
    # the Fleet API (the routes SuperNodes use) and GET /health to the SuperLink on loopback.
    # external: a proxy of yours does that (the Kubernetes manifests' nginx sidecar) and
    # `fedprompt server` binds nothing on `address`. Flower's Control API (submit runs,
    # register node keys, stop runs) has no login: it never faces the network.
    front: Literal["builtin", "external"] = "builtin"
    # The SuperLink's port on 127.0.0.1; 0: a free one. `external` needs it fixed (the proxy
    # forwards there).
    superlink_port: int = 0


@dataclass
class ClientConfig:
    server: str = "127.0.0.1:9092"
    root_certificates: str = ""  # the federation's CA certificate (ca.crt); required unless --insecure
    auth_key: str = ""  # this client's private key (OpenSSH ECDSA P-384, `fedprompt certs client`)
    # Where the client keeps its privacy ledger (DP accountant). "": <output>/clients in a
    # simulation, ~/.local/state/fedprompt for `fedprompt client`.
    state_dir: str = ""
    # Benchmarks: rebuild backbone, method, tokenizer and data for every message, as Flower's
    # LLM template (FlowerTune) does in each ClientApp call. Slower by design; never needed.
    reload_per_message: bool = False


@dataclass
class OutputConfig:
    dir: str = "runs/latest"
    plots: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)  # research: poisoned clients in a simulation

    @property
    def round_steps(self) -> int:
        """Local optimizer steps of one client in one federated round."""
        return self.federation.local_steps or self.train.local_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading and type checking


class _ShortRepr(reprlib.Repr):
    """repr() bounded in size: a YAML alias bomb or a 5 MB value must not become the error
    message, and an integer past Python's 4300-digit str limit must not raise while shown."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxdict, self.maxset = 3, 6, 4, 6
        self.maxstring, self.maxother, self.maxlong = 80, 80, 40

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # also keeps str() away from the digit limit
            return f"<an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits>"
        return super().repr_int(x, level)


def _show(value: Any, limit: int = 200) -> str:
    """A value as it appears in an error line: its repr, bounded in depth, items and length."""
    text = _ShortRepr().repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


INT_RANGE = (-(2**63), 2**63 - 1)  # what numpy, torch and JSON consumers of the config can hold


class _Loader(yaml.SafeLoader):
    """SafeLoader whose value conversions fail as YAML errors with a position: PyYAML raises a
    bare ValueError for e.g. `2024-13-45` (a timestamp), `!!int abc` or a 5000-digit integer,
    and a KeyError for `!!bool maybe`."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as e:  # ValueError, OverflowError, KeyError (`!!bool maybe`), ...
            why = "more than 4300 digits" if "integer string conversion" in str(e) else str(e) or type(e).__name__
            kind = str(node.tag).rsplit(":", 1)[-1]  # int, float, timestamp, ...
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {_show(node.value)} as {kind} ({why}); quote it if it is text", node.start_mark
            ) from None


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, str(tp)
    )


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to floats)."""
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        problems.append(f"{where}: {_show(value)} is not allowed; expected {_type_name(tp)}")
        return None
    if origin is list:
        if isinstance(value, str):  # `--set peft.lora_target_modules=q_proj,v_proj`
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            problems.append(f"{where}: {_show(value)} is not {_type_name(tp)}")
            return None
        mine: list[str] = []
        items = [_coerce(v, get_args(tp)[0], f"{where}[{i}]", mine) for i, v in enumerate(value)]
        problems.extend(mine[:3])  # a long list of junk is one mistake, not a screenful
        if len(mine) > 3:
            problems.append(f"{where}: {len(mine) - 3} more items are not {_type_name(get_args(tp)[0])}")
        return items
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if INT_RANGE[0] <= value <= INT_RANGE[1]:
                return value
            problems.append(f"{where}: {_show(value)} is out of range; expected a 64-bit integer")
            return None
    elif tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; users mean a number.
            try:
                value = float(value.strip())
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:  # an integer literal too large for a float
                value = math.inf
            if math.isfinite(value):
                return value
            problems.append(f"{where}: {_show(value)} is not a finite number")
            return None
    elif tp is str:
        if isinstance(value, str):
            return value
    problems.append(f"{where}: {_show(value)} is not {_type_name(tp)}")
    return None


def _build(cls: type, data: Any, where: str, problems: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where or 'config'}: expected a mapping of keys, got {_show(data)}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            shown = key if isinstance(key, str) and key.isidentifier() else _show(key)  # one line, visible
            problems.append(
                f"{where + '.' if where else ''}{shown}: unknown key; allowed keys: {', '.join(names)}"
            )
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        path = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], path, problems)
        else:
            value = _coerce(data[name], tp, path, problems)
            if value is not None:
                kwargs[name] = value
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML scalar)."""
    if "=" not in text:
        raise ConfigError([f"--set {_show(text)}: expected key.path=value, e.g. train.local_steps=50"])
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError([f"--set {_show(text)}: the key must name a section and a field, e.g. model.quantization"])
    if _field_type(parts) is str:
        # A string field takes the text as is ("Article: {text}" is not a YAML mapping here),
        # minus one pair of surrounding quotes; a typed \n or \t becomes a newline or tab.
        text_value = raw.strip()
        if len(text_value) >= 2 and text_value[0] == text_value[-1] and text_value[0] in "'\"":
            text_value = text_value[1:-1]
        return parts, text_value.replace("\\n", "\n").replace("\\t", "\t")  # shell-typed escapes
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    return parts, value


def _field_type(parts: list[str]) -> Any:
    """The annotated type at `section.field` of Config, or None if there is no such field."""
    cls: Any = Config
    for p in parts:
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if p not in hints:
            return None
        cls = hints[p]
    return cls


def _apply_override(raw: dict, parts: list[str], value: Any) -> None:
    node = raw
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML file (or the defaults when `path` is None), apply `key.path=value` overrides,
    type-check and validate. Raises ConfigError listing every problem found."""
    raw: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file {str(p)!r} does not exist; pass an existing YAML file, e.g. configs/bbc-minilm-prompt.yaml"])
        try:
            raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_Loader)
        except UnicodeDecodeError as e:
            raise ConfigError([f"config file {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start})"]) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            detail = " ".join(str(getattr(e, "problem", None) or getattr(e, "reason", None) or e).split())
            raise ConfigError([f"config file {str(p)!r} is not valid YAML{at}: {detail}"]) from None
        except RecursionError:
            raise ConfigError([f"config file {str(p)!r} is nested too deeply to be a config"]) from None
        except OSError as e:
            raise ConfigError([f"config file {str(p)!r} cannot be read: {e.strerror or e}"]) from None
        if raw is None:  # an empty file (or only comments): all defaults
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError([f"config file {str(p)!r}: expected a mapping of sections (model:, peft:, ...), got {type(raw).__name__}"])
    for ov in overrides:
        parts, value = parse_override(ov)
        _apply_override(raw, parts, value)
    problems: list[str] = []
    cfg = _build(Config, raw, "", problems)
    if not problems:
        problems.extend(_validate(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def _validate(c: Config) -> list[str]:
    """Cross-field and range checks, after types are known to be right."""
    p: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            p.append(msg)

    need(0 <= c.server.superlink_port < 65536, f"server.superlink_port: {c.server.superlink_port} is out of range; allowed 0..65535")
    need(c.server.front != "external" or c.server.superlink_port > 0,
         "server.superlink_port: server.front 'external' needs a fixed port for the proxy to forward to, e.g. 9093")
    need(c.model.name.strip() != "", "model.name: must not be empty; use minilm-l6, smollm2-135m, a local folder or a hub id")
    need(8 <= c.model.max_length <= 8192, f"model.max_length: {c.model.max_length} is out of range; allowed 8..8192")
    need(1 <= c.peft.num_virtual_tokens <= 512, f"peft.num_virtual_tokens: {c.peft.num_virtual_tokens} is out of range; allowed 1..512")
    if c.peft.method == "prompt" and c.peft.prompt_init == "text":
        need(c.peft.prompt_init_text.strip() != "", "peft.prompt_init_text: required (non-empty) when peft.prompt_init is 'text'")
    need(1 <= c.peft.lora_r <= 1024, f"peft.lora_r: {c.peft.lora_r} is out of range; allowed 1..1024")
    need(c.peft.lora_alpha > 0, f"peft.lora_alpha: {c.peft.lora_alpha} must be > 0")
    need(0.0 <= c.peft.lora_dropout < 1.0, f"peft.lora_dropout: {c.peft.lora_dropout} is out of range; allowed [0, 1)")
    need(len(c.peft.lora_target_modules) > 0, "peft.lora_target_modules: must list at least one module name, or 'auto'")

    need(c.data.dataset in ("bbc", "tweets", "file"), f"data.dataset: {c.data.dataset!r} is not allowed; expected one of 'bbc', 'tweets', 'file'")
    if c.data.dataset == "file":
        need(c.data.path.strip() != "", "data.path: required when data.dataset is 'file' (a .csv, .jsonl, .json or .parquet file)")
    if c.data.task == "generation":
        need(c.data.dataset == "file", "data.task: 'generation' needs data.dataset 'file' with prompt/response columns")
    need(0.0 < c.data.test_fraction < 1.0, f"data.test_fraction: {c.data.test_fraction} is out of range; allowed (0, 1)")
    need(c.data.max_examples >= 0, f"data.max_examples: {c.data.max_examples} must be >= 0 (0 means all)")
    need(0.0 <= c.data.min_confidence <= 1.0, f"data.min_confidence: {c.data.min_confidence} is out of range; allowed [0, 1]")
    need(c.data.alpha > 0, f"data.alpha: {c.data.alpha} must be > 0 (Dirichlet concentration)")
    need(c.data.quantity_sigma > 0, f"data.quantity_sigma: {c.data.quantity_sigma} must be > 0")
    # numpy's generators refuse negative seeds; derived per-round seeds must stay within 64 bits
    need(0 <= c.data.seed < 2**32, f"data.seed: {c.data.seed} is out of range; allowed 0..4294967295")
    need("{text}" in c.data.template, f"data.template: {c.data.template!r} must contain {{text}}")
    if c.data.label_words and c.data.labels:
        need(len(c.data.label_words) == len(c.data.labels),
             f"data.label_words: {len(c.data.label_words)} words for {len(c.data.labels)} labels; give one word per label")
    need(len(set(c.data.labels)) == len(c.data.labels), f"data.labels: {c.data.labels} has duplicates")

    t = c.train
    need(t.local_steps >= 1, f"train.local_steps: {t.local_steps} must be >= 1")
    need(t.batch_size >= 1, f"train.batch_size: {t.batch_size} must be >= 1")
    need(t.eval_batch_size >= 1, f"train.eval_batch_size: {t.eval_batch_size} must be >= 1")
    need(0 < t.lr <= 10, f"train.lr: {t.lr} is out of range; allowed (0, 10]")
    need(t.weight_decay >= 0, f"train.weight_decay: {t.weight_decay} must be >= 0")
    need(0 <= t.momentum < 1, f"train.momentum: {t.momentum} is out of range; allowed [0, 1)")
    need(t.warmup_steps >= 0, f"train.warmup_steps: {t.warmup_steps} must be >= 0")
    need(t.eval_every >= 0, f"train.eval_every: {t.eval_every} must be >= 0 (0: only at start and end)")
    need(t.max_eval_examples >= 0, f"train.max_eval_examples: {t.max_eval_examples} must be >= 0 (0: all)")
    need(0 <= t.seed < 2**32, f"train.seed: {t.seed} is out of range; allowed 0..4294967295")

    f = c.federation
    need(f.num_clients >= 1, f"federation.num_clients: {f.num_clients} must be >= 1")
    need(f.rounds >= 1, f"federation.rounds: {f.rounds} must be >= 1")
    need(0 < f.fraction_fit <= 1, f"federation.fraction_fit: {f.fraction_fit} is out of range; allowed (0, 1]")
    need(1 <= f.min_clients, f"federation.min_clients: {f.min_clients} must be >= 1")
    need(f.min_clients <= f.num_clients, f"federation.min_clients: {f.min_clients} exceeds federation.num_clients ({f.num_clients}); lower it or add clients")
    need(f.local_steps >= 0, f"federation.local_steps: {f.local_steps} must be >= 0 (0: train.local_steps)")
    need(0 <= f.fraction_evaluate <= 1, f"federation.fraction_evaluate: {f.fraction_evaluate} is out of range; allowed [0, 1] (0: no federated evaluation)")
    need(0 <= f.trim_fraction < 0.5, f"federation.trim_fraction: {f.trim_fraction} is out of range; allowed [0, 0.5)")
    need(f.round_timeout >= 0, f"federation.round_timeout: {f.round_timeout} must be >= 0 seconds (0: no limit)")
    need(f.workers >= 1, f"federation.workers: {f.workers} must be >= 1")
    need(f.proximal_mu >= 0, f"federation.proximal_mu: {f.proximal_mu} must be >= 0")
    need(f.server_lr > 0, f"federation.server_lr: {f.server_lr} must be > 0")
    need(f.num_malicious >= 0, f"federation.num_malicious: {f.num_malicious} must be >= 0")
    need(f.norm_bound >= 0, f"federation.norm_bound: {f.norm_bound} must be >= 0 (0: off)")
    need(f.reject_norm_factor == 0 or f.reject_norm_factor > 1, f"federation.reject_norm_factor: {f.reject_norm_factor} is out "
         "of range; allowed 0 (off) or > 1 (a multiple of the round's median update norm)")
    per_round = max(int(f.num_clients * f.fraction_fit), 1)  # what Flower samples (strategy.sampled_clients)
    if f.strategy in ("krum", "multikrum"):
        # Krum scores each update by its n - f - 2 nearest others: with n <= 2f + 2 the f attackers
        # can make up an honest update's neighbourhood and the selection proves nothing.
        need(per_round > 2 * f.num_malicious + 2, f"federation.strategy: {f.strategy!r} with federation.num_malicious "
             f"{f.num_malicious} needs more than {2 * f.num_malicious + 2} clients per round, {per_round} are sampled "
             f"(num_clients {f.num_clients} x fraction_fit {f.fraction_fit}); add clients, raise fraction_fit or lower num_malicious")
    if f.strategy == "trimmedmean" and f.num_malicious > 0:
        cut = int(f.trim_fraction * per_round)
        if 2 * f.num_malicious >= per_round:
            need(False, f"federation.num_malicious: {f.num_malicious} with trimmedmean needs more than {2 * f.num_malicious} "
                 f"clients per round, {per_round} are sampled; add clients, raise fraction_fit or lower num_malicious")
        else:  # the smallest 3-decimal fraction whose cut reaches num_malicious
            least = math.ceil(f.num_malicious / per_round * 1000) / 1000
            need(cut >= f.num_malicious, f"federation.trim_fraction: {f.trim_fraction} cuts {cut} of {per_round} sampled updates "
                 f"from each end, fewer than federation.num_malicious ({f.num_malicious}); raise it to at least {least:g}")

    pr = c.privacy
    need(pr.noise_multiplier >= 0, f"privacy.noise_multiplier: {pr.noise_multiplier} must be >= 0")
    need(pr.max_grad_norm > 0, f"privacy.max_grad_norm: {pr.max_grad_norm} must be > 0")
    need(pr.target_epsilon >= 0, f"privacy.target_epsilon: {pr.target_epsilon} must be >= 0 (0: use noise_multiplier)")
    need(0 < pr.delta < 1, f"privacy.delta: {pr.delta} is out of range; allowed (0, 1)")
    need(pr.max_noise_multiplier > 0, f"privacy.max_noise_multiplier: {pr.max_noise_multiplier} must be > 0")
    need(pr.client_noise_multiplier > 0, f"privacy.client_noise_multiplier: {pr.client_noise_multiplier} must be > 0")
    need(pr.client_clip_norm > 0, f"privacy.client_clip_norm: {pr.client_clip_norm} must be > 0")
    if pr.mode in ("sample", "both"):
        need(pr.noise_multiplier > 0 or pr.target_epsilon > 0,
             "privacy.noise_multiplier: 0 with privacy.mode 'sample' adds no noise (no DP guarantee); set it > 0 or set privacy.target_epsilon")
        need(not (f.strategy == "fedprox" and f.proximal_mu > 0),
             f"federation.proximal_mu: {f.proximal_mu} with privacy.mode {pr.mode!r}: the DP optimizer replaces the gradient "
             "with the clipped, noised one, so FedProx's proximal term would be silently dropped; use fedavg (or mu 0)")
        # The DeepSpeed settings under which what DeepSpeed steps is what Opacus clipped and noised.
        d = c.deepspeed
        need(d.zero_stage == 0, f"deepspeed.zero_stage: {d.zero_stage} with privacy.mode {pr.mode!r}: ZeRO partitions the gradients "
             "into flat buffers the per-example clipping never sees; use zero_stage 0 (the payload is tiny)")
        need(d.precision == "fp32", f"deepspeed.precision: {d.precision!r} with privacy.mode {pr.mode!r}: DeepSpeed's bf16 optimizer "
             "steps fp32 master copies that carry no per-example gradients; use fp32 (the backbone may still be quantized)")
        need(d.gradient_accumulation_steps == 1, f"deepspeed.gradient_accumulation_steps: {d.gradient_accumulation_steps} with "
             f"privacy.mode {pr.mode!r}: a Poisson-sampled batch is one step; raise train.batch_size instead")
    if pr.mode in ("client", "both"):
        need(f.strategy in ("fedavg", "fedprox"),
             f"federation.strategy: {f.strategy!r} with privacy.mode {pr.mode!r}: client-level DP bounds each client's share "
             "of a plain mean; use fedavg or fedprox (a server optimizer or a robust aggregate changes the sensitivity)")
        need(not pr.adaptive_clipping,
             "privacy.adaptive_clipping: true is refused: Flower 1.41's adaptive-clipping wrappers update the clip norm before "
             "sizing the noise, so a shrinking norm adds less noise than accounted; use fixed clipping (privacy.client_clip_norm)")
        need(f.norm_bound == 0, f"federation.norm_bound: {f.norm_bound} with privacy.mode {pr.mode!r}: the DP wrapper already "
             "clips every update to privacy.client_clip_norm (the bound its noise is sized for); set norm_bound 0 and lower "
             "client_clip_norm instead")
        n_clients = max(f.num_clients, 1)  # 0 is reported above; the message below must still format
        need(pr.delta < 1 / n_clients,
             f"privacy.delta: {pr.delta} with privacy.mode {pr.mode!r} must be < 1 / federation.num_clients ({1 / n_clients:.3g})")

    a = c.audit
    need(0 <= a.client < f.num_clients, f"audit.client: {a.client} is out of range; allowed 0..{f.num_clients - 1} (a partition id)")
    need(0 <= a.canaries <= 1000, f"audit.canaries: {a.canaries} is out of range; allowed 0..1000")
    need(1 <= a.canary_repeats <= 100, f"audit.canary_repeats: {a.canary_repeats} is out of range; allowed 1..100")
    need(1 <= a.references <= 100_000, f"audit.references: {a.references} is out of range; allowed 1..100000")

    at = c.attack
    need(0 <= at.clients < f.num_clients, f"attack.clients: {at.clients} is out of range; allowed 0..{f.num_clients - 1} "
         "(the last attack.clients of federation.num_clients partitions attack)")
    need(not 0 < at.clients < f.num_clients or c.audit.client < f.num_clients - at.clients,
         f"audit.client: {c.audit.client} is one of the attacking partitions (the last attack.clients = {at.clients}); "
         "audit an honest client")

    d = c.deepspeed
    need(d.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage: {d.zero_stage} is not allowed; expected 0, 1, 2 or 3")
    need(d.gradient_accumulation_steps >= 1, f"deepspeed.gradient_accumulation_steps: {d.gradient_accumulation_steps} must be >= 1")
    need(d.gradient_clipping >= 0, f"deepspeed.gradient_clipping: {d.gradient_clipping} must be >= 0 (0: off)")
    return p
