"""Typed configuration: the dataclass schemas of every config group, and their Hydra registration.

This is the only module that knows Hydra. ``run.py`` composes a config, converts it once with
``OmegaConf.to_object`` into the dataclasses below, and everything downstream receives plain typed objects.
Each YAML option under ``conf/<group>/`` starts from a schema registered here (``defaults: [base_<kind>]``),
so a typo in a key or a wrong type fails at composition with Hydra's message naming the key.
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
class ScorerSpec:
    """One score column. ``direction: -1`` turns a cost into a safety utility, explicitly."""

    name: str = MISSING
    direction: int = 1

    def __post_init__(self) -> None:
        if self.direction not in (1, -1):
            raise ValueError(f"scorer direction for {self.name!r}: 1 (higher is better) or -1 (a cost)")


@dataclass
class TabularScorerConfig:
    """Gold scores read from the tabular world's tables."""

    kind: str = "tabular"
    reward: ScorerSpec = field(default_factory=lambda: ScorerSpec(name="helpfulness"))
    safety: list[ScorerSpec] = field(default_factory=lambda: [ScorerSpec(name="harmlessness")])


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
class AlgorithmConfig:
    name: str = "mocan"
    beta: float = 0.1  # KL coefficient β: the same β in the dual and in the stage-2 loss
    labels: str = "soft"  # soft: p = σ(Δ r_λ) in the loss; sampled: Bernoulli(p) hard labels (the paper)
    pairs_per_prompt: int = 8
    dual: DualConfig = field(default_factory=DualConfig)

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"algorithm.beta: the KL coefficient must be > 0, got {self.beta}")
        if self.labels not in ("soft", "sampled"):
            raise ValueError(f"algorithm.labels: 'soft' or 'sampled', got {self.labels!r}")
        _positive(self, "pairs_per_prompt")


@dataclass
class SamplingConfig:
    num_samples: int = 64  # K responses per prompt from π_ref: the dual's sample and the pair pool
    exact: bool = False  # tabular only: list every candidate with its π_ref probability instead of sampling

    def __post_init__(self) -> None:
        if self.num_samples < 2:
            raise ValueError(f"sampling.num_samples: the dual needs K >= 2, got {self.num_samples}")


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

    def __post_init__(self) -> None:
        _positive(self, "lr", "epochs", "batch_size", "grad_accum", "log_every")
        if self.scheduler not in ("constant", "cosine"):
            raise ValueError(f"trainer.scheduler: 'constant' or 'cosine', got {self.scheduler!r}")


@dataclass
class EvalConfig:
    bootstrap: int = 1000  # resamples for confidence intervals of the achieved gains
    level: float = 0.95
    # Allowance, in safety units, for "constraint met": stage 2 is a finite optimisation from samples.
    tolerance: float = 0.02


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
    run_dir: str | None = None  # filled from Hydra's output directory at start-up

    def __post_init__(self) -> None:
        n = getattr(self.dataset, "n_constraints", len(self.safety.constraints))
        if len(self.safety.constraints) != n or len(self.scorer.safety) != n:
            raise ValueError(
                f"safety.constraints ({len(self.safety.constraints)}) and scorer.safety "
                f"({len(self.scorer.safety)}) must both name the dataset's {n} safety scores"
            )


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        if not getattr(obj, name) > 0:
            raise ValueError(f"{type(obj).__name__}.{name}: must be > 0, got {getattr(obj, name)}")


# ----------------------------------------------------------------------------------------------------------
# Hydra registration


def register_configs() -> None:
    """Register every schema with Hydra's ConfigStore (called once, by run.py, before composition)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="dataset", name="base_tabular", node=TabularDatasetConfig)
    cs.store(group="model", name="base_tabular", node=TabularModelConfig)
    cs.store(group="scorer", name="base_tabular", node=TabularScorerConfig)
    cs.store(group="safety", name="base_safety", node=SafetyConfig)
    cs.store(group="algorithm", name="base_algorithm", node=AlgorithmConfig)
    cs.store(group="trainer", name="base_trainer", node=TrainerConfig)
    cs.store(group="tracker", name="base_tracker", node=TrackerConfig)


def hydra_run_context() -> dict[str, Any]:
    """Where Hydra put this job and whether it is part of a multirun (for output paths and W&B groups)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return {
        "output_dir": hc.runtime.output_dir,
        "multirun": multirun,
        "sweep_dir": hc.sweep.dir if multirun else None,
        "job_num": hc.job.num if multirun else None,
        "overrides": list(hc.overrides.task),
    }
