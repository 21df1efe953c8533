"""The configuration's schema: one dataclass per section, with defaults and the comments
that say what each key means. Validation lives in checks.py, loading in loader.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


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
    # Federated classification under label skew: a client's local loss sees the class logits
    # plus tau x log(its own label frequencies), so it stops pushing down the classes it rarely
    # or never holds (1: balanced softmax; absent classes leave its softmax: restricted
    # softmax). Predictions use the plain logits; nothing extra travels. 0: off.
    logit_adjustment: float = 0.0


@dataclass
class FederationConfig:
    num_clients: int = 8  # simulation: virtual clients (= data partitions)
    rounds: int = 10
    local_steps: int = 0  # optimizer steps per sampled client per round; 0: train.local_steps
    fraction_fit: float = 1.0  # share of connected clients sampled to train each round
    fraction_evaluate: float = 1.0  # share sampled to evaluate on their local test split; 0: off
    centralized_eval: bool = True  # simulation: also evaluate on the whole held-out test split
    min_clients: int = 2  # the server waits for this many connected clients before a round
    strategy: Literal["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedmedian", "trimmedmean", "krum", "multikrum"] = "fedavg"
    proximal_mu: float = 0.0  # fedprox: weight of the proximal term mu/2 ||w - w_global||^2
    server_lr: float = 1e-2  # fedadam / fedyogi: server learning rate (eta)
    server_momentum: float = 0.5  # fedavgm: share of the previous server step carried into the next (server lr 1)
    trim_fraction: float = 0.2  # trimmedmean: share cut from each end, per coordinate
    num_malicious: int = 0  # krum / multikrum: f, attackers tolerated per round (needs > 2f + 2 sampled clients)
    norm_bound: float = 0.0  # L2 bound on each client's update (reply - global), scaled down to it; 0: off
    reject_norm_factor: float = 10.0  # reject an update longer than this x the round's median update norm; 0: off
    # Seconds to wait for a round's replies; 0: derived from the rounds so far (3 x the slowest
    # complete exchange + 10 s; 30 min for the first): a hung client never stalls the run.
    round_timeout: float = 0.0
    # Untrusted participants. A client's example count is its claim: `examples` weights updates
    # (and evaluation means) by the claims, each capped at max_weight_factor x the round's median
    # claim (0: uncapped); `uniform` weighs every client the same.
    weighting: Literal["examples", "uniform"] = "examples"
    max_weight_factor: float = 1.0
    # Round 0's tensors (and the wire contract) are the seeded initial payload that a strict
    # majority of this many clients agree on (fewer when fewer are connected at the start)...
    init_quorum: int = 3
    # ...or a trusted PEFT adapter folder (adapter_model.safetensors + adapter_config.json),
    # e.g. an earlier run's adapter/ to continue from it.
    initial_adapter: str = ""
    # LoRA only: how factors are aggregated (fedprompt/lora_aggregation.py). factors: the mean
    # of A and of B; ffa: A frozen at the shared seeded init, only B trained and exchanged (exact
    # mean, half the bytes); svd: the best rank-r factors of the weighted mean of the B @ A.
    lora_aggregation: Literal["factors", "ffa", "svd"] = "factors"
    # LoRA with svd, simulation only: virtual client i trains at rank lora_ranks[i % len] (e.g.
    # [4, 8, 16]); the global is kept at the largest, which must be peft.lora_r. [] : every
    # client at peft.lora_r. (A deployment client sets its own peft.lora_r instead.)
    lora_ranks: list[int] = field(default_factory=list)
    workers: int = 1  # simulation: worker processes, each holding one backbone
    # Simulation engine. flower: Flower's (a SuperLink and Ray workers, one per
    # federation.workers). inprocess: one worker, this process: the same round loop, client code,
    # messages and outputs, without the SuperLink, Ray and their daemons (on 2 cores they slow
    # the training ~10%, docs/sim-engines.md). Needs federation.workers 1.
    engine: Literal["flower", "inprocess"] = "flower"
    # Secure aggregation (Flower's SecAgg+, server/secagg.py): the server unmasks only the
    # weighted mean of a round's updates, never one client's. Each client masks its update
    # (local - global), each coordinate quantized to quantization_range levels over
    # [-clipping_range, clipping_range]; a larger coordinate is clipped silently, so pick
    # clipping_range from a plain run's updates, or bound the updates with client_norm_bound.
    secure_aggregation: bool = False
    num_shares: int = 0  # holders of each client's secret shares, itself included; 0: every sampled client
    reconstruction_threshold: int = 0  # shares that rebuild a secret; 0: a strict majority of num_shares
    clipping_range: float = 0.0  # c: the largest |coordinate| of an update kept exactly; 0: client_norm_bound
    quantization_range: int = 4194304  # Q (2^22): levels over [-c, c]; sampled clients x Q must stay below 2^32
    # Each client scales its own update down to this L2 norm before masking (the defence that
    # works under secure aggregation, where the server sees no single update); 0: off.
    client_norm_bound: float = 0.0


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
    # Refused when true under client-level DP: Flower 1.42's adaptive wrappers under-noise
    # (config check below says why). Kept as a key so the reason is given, not "unknown key".
    adaptive_clipping: bool = False


@dataclass
class AuditConfig:
    """Empirical privacy audit (fedprompt audit; after every simulation with privacy on)."""

    client: int = 0  # the audited client (partition id): its training examples are the members
    canaries: int = 0  # random secrets planted in that client's training data
    canary_repeats: int = 4  # copies of each canary in the training data
    references: int = 255  # unplanted candidate secrets each canary is ranked against
    # The server's label-inference attack on one replayed round, plain vs secure aggregation
    # (classification; costs one round of local training for every client).
    server_view: bool = True


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
    # host:port where `fedprompt server` serves Prometheus metrics (rounds, clients, rejections
    # by reason, bytes, round time, epsilon); "": off.
    metrics_address: str = ""


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
    # A global payload whose L2 norm exceeds this x the norm of the method's seeded initial
    # payload is refused (a crafted global from a compromised server); 0: off.
    max_global_norm_factor: float = 10.0
    # A client the server refuses as not registered tries again for this long (s) before it
    # stops: a server registers its keys just after it starts, and Flower refuses a key whose
    # previous connection still looks online for up to 2 heartbeats of 30 s.
    registration_grace_s: float = 75.0
    # `fedprompt client` only: run local training as this many data-parallel ranks (one per
    # GPU, or CPU processes over gloo), started once; train.batch_size is the global batch.
    ranks: int = 1


@dataclass
class OutputConfig:
    dir: str = "runs/latest"
    plots: bool = True
    # Experiment trackers (fedprompt/tracking.py): tensorboard (event files in <run>/tensorboard),
    # mlflow (MLFLOW_TRACKING_URI, else a store in <run>/mlruns). A tracker that fails warns once.
    trackers: list[Literal["tensorboard", "mlflow"]] = field(default_factory=list)
    experiment: str = "fedprompt"  # the MLflow experiment's name


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
