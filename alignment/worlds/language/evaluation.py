"""Evaluation of a language policy on held-out prompts: fresh samples of the policy and of π_ref, scored; gains,
a KL estimate and win rates with bootstrap intervals over prompts; a table of generations; and lm-eval tasks
(refusal, over-refusal, a small capability task) on both models when ``eval.lmeval`` is on."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from alignment.config import EvalConfig, SamplingConfig
from alignment.intervals import percentile_interval
from alignment.sampling import Samples
from alignment.store import ArtifactStore, atomic_write_json, content_digest
from alignment.worlds.language.model import PolicyModel, TrainedAdapter
from alignment.worlds.language.prompts import PromptSplit


class CachedStages(Protocol):
    """The language world's cached sampling and scoring (``LanguageWorld``), which evaluation reuses."""

    def generate(self, stage: str, prompts: list[str], num_samples: int, seed: int, *,
                 adapter: TrainedAdapter | None) -> Samples: ...

    def score_texts(self, prompts: list[str], responses: list[list[str]]) -> tuple[np.ndarray, np.ndarray]: ...

    sampling: SamplingConfig  # its temperature T: π_ref and the policy are their logits at T


def paired_gain(policy_scores: np.ndarray, ref_scores: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Bootstrap draws of E policy - E ref over resampled prompts. scores: [N, S] or [N, S, m]; idx [B, N]."""
    per_prompt = policy_scores.mean(axis=1) - ref_scores.mean(axis=1)
    return per_prompt[idx].mean(axis=1)


def evaluate_held_out(stages: CachedStages, model: PolicyModel, prompts: list[str], e: EvalConfig,
                      policy: TrainedAdapter | None, rng: np.random.Generator, tracker: Any) -> dict[str, Any]:
    """Held-out ``prompts``: ``e.num_samples`` samples each of the trained policy and of π_ref, scored; gains, KL
    estimate and win rates with bootstrap CIs over prompts, and a table of generations."""
    from alignment.policies import sequence_logprob

    handle, max_length = model.handle, model.config.max_length
    m = e.num_samples
    seed = int(rng.integers(0, 2**31 - 1))
    ref = stages.generate("eval_samples", prompts, m, seed, adapter=None)
    generated = stages.generate("eval_samples", prompts, m, seed, adapter=policy)
    ref_r, ref_g = stages.score_texts(prompts, ref)
    pol_r, pol_g = stages.score_texts(prompts, generated)
    flat_p = [p for p in prompts for _ in range(m)]
    flat_y = generated.flat_ids()  # the drawn ids: the KL is of them
    t = stages.sampling.temperature  # π_ref and the policy as sampled: their logits at T
    with model.acting_as(policy):
        logp = sequence_logprob(handle.model, handle.tokenizer, flat_p, flat_y, max_length=max_length, temperature=t)
    with handle.reference():
        ref_logp = sequence_logprob(handle.model, handle.tokenizer, flat_p, flat_y, max_length=max_length,
                                    temperature=t)
    kl_per_prompt = (logp - ref_logp).numpy().reshape(len(prompts), m).mean(axis=1)
    n = len(prompts)
    idx = rng.integers(0, n, size=(e.bootstrap, n))
    safety_draws = paired_gain(pol_g, ref_g, idx)
    reward_draws = paired_gain(pol_r, ref_r, idx)

    def win_rate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return ((a > b) + 0.5 * (a == b)).mean(axis=1)  # per prompt, sample i against sample i

    win_h = win_rate(pol_r, ref_r)
    win_s = win_rate(pol_g[..., 0], ref_g[..., 0])
    rows = [[prompts[i], ref[i][0], generated[i][0], float(ref_r[i, 0]), float(pol_r[i, 0]),
             float(ref_g[i, 0, 0]), float(pol_g[i, 0, 0])] for i in range(min(e.table_rows, n))]
    tracker.log_table("eval/generations", ["prompt", "reference", "policy", "reward_ref", "reward_policy",
                                           "safety_ref", "safety_policy"], rows)
    return {
        "eval/reward_gain": float(pol_r.mean() - ref_r.mean()),
        "eval/reward_gain_ci": percentile_interval(reward_draws, e.level),
        "eval/safety_gain": (pol_g.mean(axis=(0, 1)) - ref_g.mean(axis=(0, 1))).tolist(),
        "eval/safety_gain_ci": percentile_interval(safety_draws, e.level),
        "eval/safety_draws": safety_draws,
        "eval/reward_draws": reward_draws,
        "eval/scores": {"policy_safety": pol_g[..., 0].ravel(), "reference_safety": ref_g[..., 0].ravel()},
        "eval/kl": float(kl_per_prompt.mean()),
        "eval/kl_ci": percentile_interval(kl_per_prompt[idx].mean(axis=1), e.level),
        "eval/win_rate_helpfulness": float(win_h.mean()),
        "eval/win_rate_helpfulness_ci": percentile_interval(win_h[idx].mean(axis=1), e.level),
        "eval/win_rate_safety": float(win_s.mean()),
        "eval/win_rate_safety_ci": percentile_interval(win_s[idx].mean(axis=1), e.level),
        "eval/reference_reward": float(ref_r.mean()),
        "eval/reference_safety": ref_g.mean(axis=(0, 1)).tolist(),
        "eval/prompts": n,
        "eval/exact": False,
    }


def lmeval_entries(model: PolicyModel, model_id: dict[str, Any], split: PromptSplit, e: EvalConfig, seed: int,
                   store: ArtifactStore, policy: TrainedAdapter | None) -> dict[str, float]:
    """lm-eval on π_ref and on the policy (``eval.lmeval``): refusal on the held-out harmful prompts of
    ``split``, over-refusal on its held-out benign ones, a small capability task, and any named lm-eval task;
    ``seed``: the dataset's (the task files' order). Cached per model like any stage."""
    if not e.lmeval:
        return {}
    from alignment.lmeval import BATCH_SIZE, run_lmeval, summary_entries, tasks_digest, write_tasks

    flags = split.held_out_harmful
    if flags is None:
        raise ValueError("eval.lmeval: this dataset does not say which held-out prompts are harmful; "
                         "use dataset=toy or dataset=real-prompts, or set eval.lmeval=false")
    prompts = split.held_out
    harmful = [p for p, h in zip(prompts, flags) if h]
    benign = [p for p, h in zip(prompts, flags) if not h]
    task_dir = write_tasks(store.root / "lmeval_tasks" / content_digest([harmful, benign, e.lmeval_max_gen_toks])[:16],
                           harmful, benign, max_gen_toks=e.lmeval_max_gen_toks, seed=seed)
    task_digest = tasks_digest(task_dir)

    def results(adapter: TrainedAdapter | None) -> dict[str, float]:
        """One model's results, cached like any stage: π_ref's are shared by every run on these prompts,
        and a rerun of a finished run does not evaluate again (lm-eval's generation is greedy)."""
        spec = {"model": model_id, "adapter": adapter and adapter.key, "tasks": list(e.lmeval_tasks),
                "limit": e.lmeval_limit, "task_files": task_digest, "seed": seed, "lm_eval": version("lm_eval"),
                "batch_size": BATCH_SIZE}  # padding within a batch can move a greedy token by float rounding

        def compute(out: Path) -> None:
            handle = model.handle
            with model.acting_as(adapter):
                found = run_lmeval(handle.model, handle.tokenizer, task_dir, e.lmeval_tasks, limit=e.lmeval_limit)
            atomic_write_json(out / "results.json", found)

        entry = store.get_or_compute("lmeval", spec, compute=compute, version="1")
        return json.loads((entry.path / "results.json").read_text())

    return summary_entries(results(policy), results(None))
