"""Cross-field and range checks of a loaded config, after types are known to be right."""

from __future__ import annotations

import math
from pathlib import Path

from fedprompt.config.schema import Config

MAX_LORA_RANK = 1024  # peft.lora_r's range; a global of a higher rank is refused, not allocated


def validate(c: Config) -> list[str]:
    """Cross-field and range checks, after types are known to be right."""
    p: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            p.append(msg)

    need(0 <= c.server.superlink_port < 65536, f"server.superlink_port: {c.server.superlink_port} is out of range; allowed 0..65535")
    need(
        c.server.front != "external" or c.server.superlink_port > 0,
        "server.superlink_port: server.front 'external' needs a fixed port for the proxy to forward to, e.g. 9093",
    )
    need(c.model.name.strip() != "", "model.name: must not be empty; use minilm-l6, smollm2-135m, a local folder or a hub id")
    need(8 <= c.model.max_length <= 8192, f"model.max_length: {c.model.max_length} is out of range; allowed 8..8192")
    need(1 <= c.peft.num_virtual_tokens <= 512, f"peft.num_virtual_tokens: {c.peft.num_virtual_tokens} is out of range; allowed 1..512")
    if c.peft.method == "prompt" and c.peft.prompt_init == "text":
        need(c.peft.prompt_init_text.strip() != "", "peft.prompt_init_text: required (non-empty) when peft.prompt_init is 'text'")
    need(1 <= c.peft.lora_r <= MAX_LORA_RANK, f"peft.lora_r: {c.peft.lora_r} is out of range; allowed 1..{MAX_LORA_RANK}")
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
        need(
            len(c.data.label_words) == len(c.data.labels),
            f"data.label_words: {len(c.data.label_words)} words for {len(c.data.labels)} labels; give one word per label",
        )
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
    need(f.round_timeout >= 0, f"federation.round_timeout: {f.round_timeout} must be >= 0 seconds (0: derived from the rounds so far)")
    need(
        f.max_weight_factor == 0 or f.max_weight_factor >= 1,
        f"federation.max_weight_factor: {f.max_weight_factor} is out of range; allowed 0 (claims uncapped) or >= 1 (a multiple of the round's median claim)",
    )
    need(f.init_quorum >= 1, f"federation.init_quorum: {f.init_quorum} must be >= 1 (clients asked for the initial payload)")
    if f.initial_adapter:
        folder = Path(f.initial_adapter).expanduser()
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            need(
                (folder / name).is_file(),
                f"federation.initial_adapter: {folder / name} not found; "
                "give a PEFT adapter folder (an earlier run's adapter/, or peft's save_pretrained output)",
            )
    need(
        c.client.max_global_norm_factor == 0 or c.client.max_global_norm_factor >= 1,
        f"client.max_global_norm_factor: {c.client.max_global_norm_factor} is out of range; allowed 0 (off) or >= 1 (a multiple of the initial payload's norm)",
    )
    need(f.workers >= 1, f"federation.workers: {f.workers} must be >= 1")
    need(
        f.engine != "inprocess" or f.workers == 1,
        f"federation.engine inprocess runs one worker, this process; federation.workers is {f.workers}: set it to 1, or use federation.engine flower",
    )
    need(c.client.registration_grace_s >= 0, f"client.registration_grace_s: {c.client.registration_grace_s} must be >= 0 (seconds)")
    need(1 <= c.client.ranks <= 64, f"client.ranks: {c.client.ranks} is out of range; allowed 1..64")
    if c.client.ranks > 1:
        need(
            c.train.batch_size % c.client.ranks == 0,
            f"train.batch_size: {c.train.batch_size} is the global batch of client.ranks {c.client.ranks} ranks, which must divide it "
            f"(each rank trains on an equal slice); use a multiple of {c.client.ranks}",
        )
    need(f.proximal_mu >= 0, f"federation.proximal_mu: {f.proximal_mu} must be >= 0")
    need(f.server_lr > 0, f"federation.server_lr: {f.server_lr} must be > 0")
    need(0 <= f.server_momentum < 1, f"federation.server_momentum: {f.server_momentum} is out of range; allowed [0, 1)")
    need(f.num_malicious >= 0, f"federation.num_malicious: {f.num_malicious} must be >= 0")
    need(f.norm_bound >= 0, f"federation.norm_bound: {f.norm_bound} must be >= 0 (0: off)")
    need(
        f.reject_norm_factor == 0 or f.reject_norm_factor > 1,
        f"federation.reject_norm_factor: {f.reject_norm_factor} is out of range; allowed 0 (off) or > 1 (a multiple of the round's median update norm)",
    )
    per_round = max(int(f.num_clients * f.fraction_fit), 1)  # what Flower samples (strategy.sampled_clients)
    if f.strategy in ("krum", "multikrum"):
        # Krum scores each update by its n - f - 2 nearest others: with n <= 2f + 2 the f attackers
        # can make up an honest update's neighbourhood and the selection proves nothing.
        need(
            per_round > 2 * f.num_malicious + 2,
            f"federation.strategy: {f.strategy!r} with federation.num_malicious "
            f"{f.num_malicious} needs more than {2 * f.num_malicious + 2} clients per round, {per_round} are sampled "
            f"(num_clients {f.num_clients} x fraction_fit {f.fraction_fit}); add clients, raise fraction_fit or lower num_malicious",
        )
    if f.strategy == "trimmedmean" and f.num_malicious > 0:
        cut = int(f.trim_fraction * per_round)
        if 2 * f.num_malicious >= per_round:
            need(
                False,
                f"federation.num_malicious: {f.num_malicious} with trimmedmean needs more than {2 * f.num_malicious} "
                f"clients per round, {per_round} are sampled; add clients, raise fraction_fit or lower num_malicious",
            )
        else:  # the smallest 3-decimal fraction whose cut reaches num_malicious
            least = math.ceil(f.num_malicious / per_round * 1000) / 1000
            need(
                cut >= f.num_malicious,
                f"federation.trim_fraction: {f.trim_fraction} cuts {cut} of {per_round} sampled updates "
                f"from each end, fewer than federation.num_malicious ({f.num_malicious}); raise it to at least {least:g}",
            )

    _secure_aggregation(c, need, per_round)

    pr = c.privacy
    need(c.train.logit_adjustment >= 0, f"train.logit_adjustment: {c.train.logit_adjustment} must be >= 0 (0: off)")
    if pr.mode in ("sample", "both"):
        need(
            c.train.logit_adjustment == 0,
            f"train.logit_adjustment: {c.train.logit_adjustment} with privacy.mode {pr.mode!r}: the adjustment is computed from "
            "all of the client's labels, so each example's gradient would depend on the others' (DP-SGD's accounting "
            "assumes it does not); set it to 0",
        )
    if f.lora_aggregation != "factors":
        need(
            c.peft.method == "lora",
            f"federation.lora_aggregation: {f.lora_aggregation!r} applies to peft.method 'lora', not {c.peft.method!r}; remove it (or use 'factors')",
        )
    if f.lora_aggregation == "ffa" and c.peft.method == "lora":
        need(
            not f.initial_adapter,
            "federation.initial_adapter with lora_aggregation 'ffa': the clients keep A at their own seeded initialisation and "
            "never receive the adapter's, so the export would not hold the A they trained with; start from the seeded payload "
            "(remove initial_adapter) or use lora_aggregation 'factors' or 'svd'",
        )
    if f.lora_aggregation == "svd":
        # The SVD replaces the strategy's mean of the factors with its own weighted mean of the
        # products: a server optimizer, a per-coordinate robust aggregate or the DP wrapper's
        # noised mean would be computed and then discarded.
        need(
            f.strategy in ("fedavg", "fedprox", "krum", "multikrum"),
            f"federation.lora_aggregation: 'svd' with federation.strategy {f.strategy!r}: the SVD takes the weighted mean of "
            "B @ A itself; use fedavg, fedprox, krum or multikrum (or lora_aggregation 'ffa', whose mean is exact under any strategy)",
        )
        need(
            pr.mode not in ("client", "both"),
            f"federation.lora_aggregation: 'svd' with privacy.mode {pr.mode!r}: client-level DP noises the mean of the factors, "
            "which the SVD of the individual products would bypass; use lora_aggregation 'ffa' or 'factors'",
        )
    if f.lora_ranks:
        need(
            c.peft.method == "lora" and f.lora_aggregation == "svd",
            f"federation.lora_ranks: {f.lora_ranks} mixes LoRA ranks, which only peft.method 'lora' with federation.lora_aggregation "
            "'svd' aggregates (the mean of B @ A, re-factored at each rank); set both, or remove lora_ranks",
        )
        need(
            all(1 <= r <= MAX_LORA_RANK for r in f.lora_ranks) and max(f.lora_ranks) == c.peft.lora_r,
            f"federation.lora_ranks: {f.lora_ranks}: each rank must be in 1..{MAX_LORA_RANK}, and the global is kept at the largest, "
            f"so peft.lora_r ({c.peft.lora_r}) must equal it: set peft.lora_r to {max(f.lora_ranks)}",
        )
        need(
            f.strategy not in ("krum", "multikrum"),
            f"federation.lora_ranks with federation.strategy {f.strategy!r}: Krum compares updates tensor by tensor, and "
            "updates of different ranks have different shapes; use fedavg or fedprox (with federation.norm_bound against outliers)",
        )
    need(pr.noise_multiplier >= 0, f"privacy.noise_multiplier: {pr.noise_multiplier} must be >= 0")
    need(pr.max_grad_norm > 0, f"privacy.max_grad_norm: {pr.max_grad_norm} must be > 0")
    need(pr.target_epsilon >= 0, f"privacy.target_epsilon: {pr.target_epsilon} must be >= 0 (0: use noise_multiplier)")
    need(0 < pr.delta < 1, f"privacy.delta: {pr.delta} is out of range; allowed (0, 1)")
    need(pr.max_noise_multiplier > 0, f"privacy.max_noise_multiplier: {pr.max_noise_multiplier} must be > 0")
    need(pr.client_noise_multiplier > 0, f"privacy.client_noise_multiplier: {pr.client_noise_multiplier} must be > 0")
    need(pr.client_clip_norm > 0, f"privacy.client_clip_norm: {pr.client_clip_norm} must be > 0")
    if pr.mode in ("sample", "both"):
        need(
            pr.noise_multiplier > 0 or pr.target_epsilon > 0,
            "privacy.noise_multiplier: 0 with privacy.mode 'sample' adds no noise (no DP guarantee); set it > 0 or set privacy.target_epsilon",
        )
        need(
            not (f.strategy == "fedprox" and f.proximal_mu > 0),
            f"federation.proximal_mu: {f.proximal_mu} with privacy.mode {pr.mode!r}: the DP optimizer replaces the gradient "
            "with the clipped, noised one, so FedProx's proximal term would be silently dropped; use fedavg (or mu 0)",
        )
        # The DeepSpeed settings under which what DeepSpeed steps is what Opacus clipped and noised.
        d = c.deepspeed
        need(
            d.zero_stage == 0,
            f"deepspeed.zero_stage: {d.zero_stage} with privacy.mode {pr.mode!r}: ZeRO partitions the gradients "
            "into flat buffers the per-example clipping never sees; use zero_stage 0 (the payload is tiny)",
        )
        need(
            d.precision == "fp32",
            f"deepspeed.precision: {d.precision!r} with privacy.mode {pr.mode!r}: DeepSpeed's bf16 optimizer "
            "steps fp32 master copies that carry no per-example gradients; use fp32 (the backbone may still be quantized)",
        )
        need(
            d.gradient_accumulation_steps == 1,
            f"deepspeed.gradient_accumulation_steps: {d.gradient_accumulation_steps} with "
            f"privacy.mode {pr.mode!r}: a Poisson-sampled batch is one step; raise train.batch_size instead",
        )
    if pr.mode in ("client", "both"):
        need(
            f.strategy in ("fedavg", "fedprox"),
            f"federation.strategy: {f.strategy!r} with privacy.mode {pr.mode!r}: client-level DP bounds each client's share "
            "of a plain mean; use fedavg or fedprox (a server optimizer or a robust aggregate changes the sensitivity)",
        )
        need(
            not pr.adaptive_clipping,
            "privacy.adaptive_clipping: true is refused: Flower 1.42's adaptive-clipping wrappers update the clip norm before "
            "sizing the noise, so a shrinking norm adds less noise than accounted; use fixed clipping (privacy.client_clip_norm)",
        )
        need(
            f.norm_bound == 0,
            f"federation.norm_bound: {f.norm_bound} with privacy.mode {pr.mode!r}: the DP wrapper already "
            "clips every update to privacy.client_clip_norm (the bound its noise is sized for); set norm_bound 0 and lower "
            "client_clip_norm instead",
        )
        n_clients = max(f.num_clients, 1)  # 0 is reported above; the message below must still format
        need(pr.delta < 1 / n_clients, f"privacy.delta: {pr.delta} with privacy.mode {pr.mode!r} must be < 1 / federation.num_clients ({1 / n_clients:.3g})")

    a = c.audit
    need(0 <= a.client < f.num_clients, f"audit.client: {a.client} is out of range; allowed 0..{f.num_clients - 1} (a partition id)")
    need(0 <= a.canaries <= 1000, f"audit.canaries: {a.canaries} is out of range; allowed 0..1000")
    need(1 <= a.canary_repeats <= 100, f"audit.canary_repeats: {a.canary_repeats} is out of range; allowed 1..100")
    need(1 <= a.references <= 100_000, f"audit.references: {a.references} is out of range; allowed 1..100000")

    at = c.attack
    need(
        0 <= at.clients < f.num_clients,
        f"attack.clients: {at.clients} is out of range; allowed 0..{f.num_clients - 1} (the last attack.clients of federation.num_clients partitions attack)",
    )
    need(
        not 0 < at.clients < f.num_clients or c.audit.client < f.num_clients - at.clients,
        f"audit.client: {c.audit.client} is one of the attacking partitions (the last attack.clients = {at.clients}); audit an honest client",
    )

    d = c.deepspeed
    need(d.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage: {d.zero_stage} is not allowed; expected 0, 1, 2 or 3")
    need(d.gradient_accumulation_steps >= 1, f"deepspeed.gradient_accumulation_steps: {d.gradient_accumulation_steps} must be >= 1")
    need(d.gradient_clipping >= 0, f"deepspeed.gradient_clipping: {d.gradient_clipping} must be >= 0 (0: off)")
    return p


SECAGG_MODULUS = 2**32  # Flower's SecAgg+ modulus_range: the masked sums live modulo this
# Strategies that order, compare or rescale individual updates: nothing to work on when the
# server only ever holds the sum.
NEEDS_INDIVIDUAL_UPDATES = ("fedmedian", "trimmedmean", "krum", "multikrum")
COMPATIBLE = "bound each update on its client with federation.client_norm_bound instead (applied before masking)"


def secagg_shares(num_shares: int, threshold: int, sampled: int) -> tuple[int, int]:
    """(num_shares, reconstruction_threshold) of a round with `sampled` clients: 0 means every
    sampled client, and a strict majority of them."""
    n = min(num_shares, sampled) if num_shares else sampled
    return n, threshold or n // 2 + 1


def secagg_problem(num_shares: int, threshold: int, sampled: int, q: int) -> str:
    """Why SecAgg+ with these (resolved) parameters must not run a round of `sampled` clients;
    "" when it may."""
    if threshold < 3:
        # With 2, a survivor whose other neighbours dropped keeps a single unknown pairwise mask,
        # and Flower derives each mask from a seed folded to 32 bits: searchable.
        return (
            f"federation.reconstruction_threshold: {threshold} ({sampled} clients per round, num_shares {num_shares}) is below 3, "
            "which can leave a client's update behind a single 32-bit mask seed; sample at least 4 clients per round "
            "(threshold 0 then resolves to 3 or more)"
        )
    if threshold >= num_shares:
        return f"federation.reconstruction_threshold: {threshold} must be below num_shares ({num_shares}) so that a lost client can be tolerated; lower it"
    if 2 * threshold <= num_shares:
        # Two disjoint groups of `threshold` holders: told "i is active" and "i is dead"
        # respectively, they would hand out both of i's secrets, i.e. i's update.
        return (
            f"federation.reconstruction_threshold: {threshold} is at most half of num_shares ({num_shares}): a server could "
            "split the holders and collect both secrets of one client; use more than half (0: a strict majority)"
        )
    if not 2 <= q < 2**31 or sampled * q >= SECAGG_MODULUS:
        return (
            f"federation.quantization_range: {q} with {sampled} clients per round: it must be in 2..2^31 - 1 and "
            f"clients x quantization_range below 2^32 (the masked sum would wrap); lower it below {SECAGG_MODULUS // max(sampled, 1)}"
        )
    return ""


def _secure_aggregation(c: Config, need, per_round: int) -> None:
    """The checks of federation.secure_aggregation: what needs individual updates is refused
    with the compatible way out, and the protocol's parameters must be safe."""
    f, pr = c.federation, c.privacy
    need(f.client_norm_bound >= 0, f"federation.client_norm_bound: {f.client_norm_bound} must be >= 0 (0: off)")
    need(f.clipping_range >= 0, f"federation.clipping_range: {f.clipping_range} must be >= 0 (0: federation.client_norm_bound)")
    if not f.secure_aggregation:
        need(
            f.client_norm_bound == 0,
            f"federation.client_norm_bound: {f.client_norm_bound} applies under federation.secure_aggregation only; "
            "without it use federation.norm_bound (the server bounds each update it sees)",
        )
        return
    why = "with federation.secure_aggregation the server only ever holds the sum of the updates"
    need(
        f.strategy not in NEEDS_INDIVIDUAL_UPDATES,
        f"federation.strategy: {f.strategy!r} {why}, and {f.strategy} needs each update; use fedavg, fedprox, fedavgm, fedadam or fedyogi, and {COMPATIBLE}",
    )
    need(f.norm_bound == 0, f"federation.norm_bound: {f.norm_bound} {why}, so it cannot bound one; set it to 0 and {COMPATIBLE}")
    need(
        f.reject_norm_factor == 0,
        f"federation.reject_norm_factor: {f.reject_norm_factor} {why}, so it cannot screen one by its norm; set it to 0 and {COMPATIBLE}",
    )
    need(
        f.lora_aggregation != "svd",
        f"federation.lora_aggregation: 'svd' {why}, and the SVD combines each client's factors; use 'factors' or 'ffa' (plain means)",
    )
    client_level = pr.mode in ("client", "both")
    need(
        not client_level or pr.clipping == "client",
        f"privacy.clipping: 'server' with federation.secure_aggregation {why}, so it cannot clip one; set privacy.clipping: client "
        "(each client clips its update to privacy.client_clip_norm before masking, and the server noises the unmasked mean)",
    )
    need(
        f.clipping_range > 0 or f.client_norm_bound > 0 or client_level,
        "federation.clipping_range: required with federation.secure_aggregation (the largest |coordinate| of an update that is "
        "kept exactly); take it from a plain run's updates, or set federation.client_norm_bound (then it defaults to that)",
    )
    if f.num_shares:
        need(
            3 <= f.num_shares <= per_round,
            f"federation.num_shares: {f.num_shares} is out of range; allowed 3..{per_round} (the clients sampled per round), or 0 for all",
        )
    need(f.reconstruction_threshold >= 0, f"federation.reconstruction_threshold: {f.reconstruction_threshold} must be >= 0 (0: a strict majority)")
    problem = secagg_problem(*secagg_shares(f.num_shares, f.reconstruction_threshold, per_round), per_round, f.quantization_range)
    need(not problem, problem)
