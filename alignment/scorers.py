"""Scorers of (prompt, response) text: the reward r and the safety utilities g.

Every score column carries an explicit direction: a cost model becomes a safety utility by ``direction: -1``
in its config, never by convention. Learned scorers load any single-label
``AutoModelForSequenceClassification`` or a Beaver ``LlamaForScore`` (alignment/score_models.py).

A score model is scored as it was trained: with ``append_eos`` on (by default for safe-rlhf checkpoints, see
:func:`resolve_append_eos`) the EOS id is appended to the token ids of the responses that ended, so a scorer
call then needs ``ended``, one flag per response: True when generation stopped at EOS (or the response is a
complete one, e.g. a dataset's), False when it was cut at ``max_new_tokens``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from alignment.config import ScorerSpec

TextScore = Callable[..., np.ndarray]  # (prompts, responses) -> [B]; model scorers also take ended=[B] bools


def _gold_scorers() -> dict[str, TextScore]:
    from alignment.worlds import toy

    return {"toy/helpfulness": toy.score_helpfulness, "toy/safety": toy.score_safety}


@dataclass
class Scorer:
    """A named scorer; ``__call__`` returns direction x raw score, [B] float64 (higher is better).

    ``append_eos`` (resolved, see :func:`resolve_append_eos`): the scorer appends EOS to the responses that
    ended, so each call must say which did (``ended``, [B] bools, or one bool for all); scorers without it
    ignore ``ended``.
    """

    name: str
    direction: int
    raw: TextScore
    append_eos: bool = False

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 ended: bool | Sequence[bool] | np.ndarray | None = None) -> np.ndarray:
        if self.append_eos:
            if ended is None:
                raise ValueError(
                    f"scorer {self.name!r} appends EOS to the responses that ended (append_eos), so it needs "
                    "ended=[one bool per response]: True where generation stopped at EOS, False where it was "
                    "cut at max_new_tokens (set append_eos: false on the scorer to score the text alone)")
            flags = np.asarray(ended, dtype=bool)
            flags = np.full(len(responses), bool(flags)) if flags.ndim == 0 else flags.reshape(-1)
            if len(flags) != len(responses):
                raise ValueError(f"scorer {self.name!r}: {len(flags)} ended flags for {len(responses)} responses")
            raw = self.raw(prompts, responses, ended=flags.tolist())
        else:
            raw = self.raw(prompts, responses)
        scores = np.asarray(raw, dtype=np.float64) * self.direction
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"scorer {self.name!r} returned NaN or inf scores; check its inputs and weights")
        return scores


@functools.lru_cache(maxsize=32)
def _trained_with_eos(path: str) -> bool:
    """Whether the checkpoint at ``path`` is a safe-rlhf score model (``LlamaForScore``, e.g. Beaver): safe-rlhf
    trains those on ``prompt + answer + eos``. Other single-label checkpoints come from other code, with other
    conventions (their own end tokens, or a pad id equal to EOS that an appended EOS would confuse)."""
    from alignment.score_models import BEAVER_ARCHITECTURES, _resolve_checkpoint_dir

    config = json.loads((_resolve_checkpoint_dir(path) / "config.json").read_text())
    return bool(set(BEAVER_ARCHITECTURES) & set(config.get("architectures") or []))


def resolve_append_eos(spec: ScorerSpec) -> bool:
    """``spec.append_eos``, or the scorer's own convention when it is unset (None): on for safe-rlhf
    ``LlamaForScore`` checkpoints, off for any other score model, for gold scorers (which read text) and for
    the learned MiniLM heads (fitted here on label texts without EOS; alignment/learned_scorers.py)."""
    if spec.append_eos is not None:
        return spec.append_eos
    return spec.kind == "model" and _trained_with_eos(str(spec.path))


def _model_scorer(spec: ScorerSpec) -> TextScore:
    from alignment.score_models import load_score_model, score_texts

    model, tokenizer = load_score_model(spec.path, dtype=spec.dtype, device=spec.device)

    def raw(prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool] | None = None) -> np.ndarray:
        texts = [spec.template.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
        return score_texts(model, tokenizer, texts, batch_size=spec.batch_size,
                           append_eos=False if ended is None else list(ended)).double().numpy()

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
        return Scorer(spec.name, spec.direction, _model_scorer(spec), append_eos=resolve_append_eos(spec))
    if spec.kind == "learned":
        return Scorer(spec.name, spec.direction, _learned_scorer(spec, cache_dir))
    gold = _gold_scorers()
    if spec.name not in gold:
        raise ValueError(f"scorer {spec.name!r}: no gold scorer of that name; choose one of {sorted(gold)} "
                         "or set kind: model with a path")
    return Scorer(spec.name, spec.direction, gold[spec.name])


def score_all(reward: Scorer, safety: Sequence[Scorer], prompts: Sequence[str], responses: Sequence[str],
              ended: Sequence[bool | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reward [B] and safety [B, m] of flat (prompt, response) pairs, one column per safety scorer."""
    return (reward(prompts, responses, ended=ended),
            np.stack([s(prompts, responses, ended=ended) for s in safety], axis=-1))


def scorer_identity(spec: ScorerSpec) -> dict:
    """What determines a scorer's output, for cache keys. ``append_eos`` is in it only when on (resolved), so
    the keys of scorers without it, and the caches made before it existed, are unchanged; a key with it must
    also hold which responses ended (the scores depend on them)."""
    identity = {"name": spec.name, "direction": spec.direction, "kind": spec.kind, "path": spec.path,
                "template": spec.template if spec.kind == "model" else None, "dtype": spec.dtype}
    if resolve_append_eos(spec):
        identity["append_eos"] = True
    return identity
