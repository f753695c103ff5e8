"""The toy world itself: seeded templated prompts (:class:`ToyPrompt`, :class:`ToyWorld`,
:func:`make_toy_world`) and π_ref's demonstrations on them (:func:`demonstrations`).

Separate because this is the only seeded part: the content and scorers are fixed, the world is what a
``dataset.seed`` chooses, and it is what the language world (alignment/worlds/language/prompts.py) loads as the toy dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alignment.store import atomic_write_json
from alignment.worlds.toy.content import (
    _FRAMES,
    _PREFIXES,
    BENIGN_STYLE_PROBS,
    HARM_CATEGORIES,
    HARMFUL_STYLE_PROBS,
    TOPICS,
    TOY_VERSION,
    Style,
    ToyPrompt,
    render_response,
    vocabulary,
)


@dataclass(frozen=True)
class ToyWorld:
    """A seeded set of prompts; everything else (styles, scorers, vocabulary) is fixed content (content.py,
    scorers.py)."""

    seed: int
    prompts: tuple[ToyPrompt, ...]
    harmful_fraction: float
    test_fraction: float

    def select(self, *, split: str | None = None, harmful: bool | None = None) -> list[ToyPrompt]:
        """Prompts of one split ("train"/"test"/None for all), optionally only harmful or only benign."""
        return [
            p
            for p in self.prompts
            if (split is None or p.split == split) and (harmful is None or p.is_harmful == harmful)
        ]

    def vocabulary(self) -> list[str]:
        """The token vocabulary (seed-independent, see :func:`vocabulary`)."""
        return vocabulary()

    def records(self) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self.prompts]

    def save(self, path: str | Path) -> None:
        """Write the world's prompt records as JSON (atomically)."""
        atomic_write_json(
            path,
            {
                "toy_version": TOY_VERSION,
                "seed": self.seed,
                "harmful_fraction": self.harmful_fraction,
                "test_fraction": self.test_fraction,
                "prompts": self.records(),
            },
        )


def _split_counts(total: int, groups: Sequence[str]) -> dict[str, int]:
    base, extra = divmod(total, len(groups))
    return {g: base + (1 if i < extra else 0) for i, g in enumerate(groups)}


def make_toy_world(
    seed: int, n_prompts: int = 240, harmful_fraction: float = 0.5, *, test_fraction: float = 0.2
) -> ToyWorld:
    """Build ``n_prompts`` templated prompts, ``round(n_prompts * harmful_fraction)`` of them harmful.

    Prompts are spread evenly over topics (benign) and harm categories (harmful); within a group, distinct
    (prefix, frame, task) combinations are drawn without replacement (repeating only if a group needs more
    than its ~140 combinations). ``test_fraction`` of each group is held out as split "test", so test
    prompts are strings the reference never saw. Deterministic in ``seed``.
    """
    if n_prompts < 1:
        raise ValueError("n_prompts must be >= 1")
    if not 0.0 <= harmful_fraction <= 1.0:
        raise ValueError("harmful_fraction must be in [0, 1]")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError("test_fraction must be in [0, 1)")
    rng = np.random.default_rng(seed)
    n_harm = round(n_prompts * harmful_fraction)
    plan: list[tuple[bool, str, int]] = []
    plan += [(True, c, n) for c, n in _split_counts(n_harm, list(HARM_CATEGORIES)).items()]
    plan += [(False, t, n) for t, n in _split_counts(n_prompts - n_harm, list(TOPICS)).items()]
    drafts: list[tuple[str, bool, str, str]] = []
    for is_harmful, group, n in plan:
        if n == 0:
            continue
        tasks = HARM_CATEGORIES[group].tasks if is_harmful else TOPICS[group].tasks
        combos = [pre + fr.replace("{t}", t) for pre in _PREFIXES for fr in _FRAMES for t in tasks]
        order = rng.permutation(len(combos))
        texts = [combos[order[i % len(combos)]] for i in range(n)]
        n_test = round(n * test_fraction)
        for i, text in enumerate(texts):
            split = "test" if i < n_test else "train"
            drafts.append((text, is_harmful, group, split))
    order = rng.permutation(len(drafts))
    prompts = []
    for i, j in enumerate(order):
        text, is_harmful, group, split = drafts[j]
        prompts.append(
            ToyPrompt(
                id=f"toy{seed}-{i:04d}",
                text=text,
                is_harmful=is_harmful,
                category=group if is_harmful else "benign",
                topic=group,
                split=split,
            )
        )
    return ToyWorld(
        seed=seed, prompts=tuple(prompts), harmful_fraction=harmful_fraction, test_fraction=test_fraction
    )


def _style_probs(prompt: ToyPrompt) -> tuple[list[Style], np.ndarray]:
    table = HARMFUL_STYLE_PROBS if prompt.is_harmful else BENIGN_STYLE_PROBS
    styles = list(table)
    probs = np.array([table[s] for s in styles], dtype=np.float64)
    return styles, probs / probs.sum()


def demonstrations(
    world: ToyWorld, seed: int, per_prompt: int, *, split: str | None = "train"
) -> list[tuple[str, str, Style]]:
    """``per_prompt`` reference-policy demonstrations ``(prompt_text, response_text, style)`` per prompt.

    Styles are drawn from :data:`HARMFUL_STYLE_PROBS` / :data:`BENIGN_STYLE_PROBS`, i.e. from π_ref's
    intended mixture; the SFT reference learns that mixture. ``split`` selects which prompts ("train" by
    default so that "test" stays held out; None for all). Deterministic in ``(world, seed, per_prompt)``.
    """
    if per_prompt < 0:
        raise ValueError("per_prompt must be >= 0")
    rng = np.random.default_rng([seed, world.seed, 7])
    out: list[tuple[str, str, Style]] = []
    for prompt in world.select(split=split):
        styles, probs = _style_probs(prompt)
        for idx in rng.choice(len(styles), size=per_prompt, p=probs):
            style = styles[int(idx)]
            out.append((prompt.text, render_response(prompt, style, rng), style))
    return out
