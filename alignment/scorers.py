"""Scorers of (prompt, response) text: the reward r and the safety utilities g.

Every score column carries an explicit direction: a cost model becomes a safety utility by ``direction: -1``
in its config, never by convention. Learned scorers load any single-label
``AutoModelForSequenceClassification`` or a Beaver ``LlamaForScore`` (alignment/score_models.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from alignment.config import ScorerSpec

TextScore = Callable[[Sequence[str], Sequence[str]], np.ndarray]


def _gold_scorers() -> dict[str, TextScore]:
    from alignment import toy

    return {"toy/helpfulness": toy.score_helpfulness, "toy/safety": toy.score_safety}


@dataclass
class Scorer:
    """A named scorer; ``__call__`` returns direction x raw score, [B] float64 (higher is better)."""

    name: str
    direction: int
    raw: TextScore

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        scores = np.asarray(self.raw(prompts, responses), dtype=np.float64) * self.direction
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"scorer {self.name!r} returned NaN or inf scores; check its inputs and weights")
        return scores


def _model_scorer(spec: ScorerSpec) -> TextScore:
    from alignment.score_models import load_score_model, score_texts

    model, tokenizer = load_score_model(spec.path, dtype=spec.dtype, device=spec.device)

    def raw(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        texts = [spec.template.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
        return score_texts(model, tokenizer, texts, batch_size=spec.batch_size).double().numpy()

    return raw


def _learned_scorer(spec: ScorerSpec, cache_dir: str | None) -> TextScore:
    from alignment.learned_scorers import learned_scorers

    heads = {"minilm/safety": "safety", "minilm/helpfulness": "helpfulness"}
    if spec.name not in heads:
        raise ValueError(f"scorer {spec.name!r}: kind learned offers {sorted(heads)}")
    if cache_dir is None:
        raise ValueError(f"scorer {spec.name!r}: learned scorers need the artifact cache (cache_dir)")
    return getattr(learned_scorers(str(cache_dir)), heads[spec.name])


def build_scorer(spec: ScorerSpec, cache_dir: str | None = None) -> Scorer:
    if spec.kind == "model":
        return Scorer(spec.name, spec.direction, _model_scorer(spec))
    if spec.kind == "learned":
        return Scorer(spec.name, spec.direction, _learned_scorer(spec, cache_dir))
    gold = _gold_scorers()
    if spec.name not in gold:
        raise ValueError(f"scorer {spec.name!r}: no gold scorer of that name; choose one of {sorted(gold)} "
                         "or set kind: model with a path")
    return Scorer(spec.name, spec.direction, gold[spec.name])


def scorer_identity(spec: ScorerSpec) -> dict:
    """What determines a scorer's output, for cache keys."""
    return {"name": spec.name, "direction": spec.direction, "kind": spec.kind, "path": spec.path,
            "template": spec.template if spec.kind == "model" else None, "dtype": spec.dtype}
