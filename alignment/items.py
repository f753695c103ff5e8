"""Stage-2 items: labelled pairs and scored lists of π_ref's responses, the data the one training loop fits.

A world hands out response ids [N, K] (into a table of candidates or of generated texts); the algorithms turn
them into items here, and the world's log-ratio function ρ(policy, batch) reads the ids back (``response_ids``).
"""

from __future__ import annotations

import numpy as np
import torch

from alignment.losses import preference_labels
from alignment.store import content_digest


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


def items_digest(items: dict[str, torch.Tensor]) -> str:
    """The identity of stage-2 items: prompts, responses and labels (pairs) or targets and base weights (lists),
    the floats rounded to 12 digits so that summation-order noise does not change it."""
    def rounded(values: torch.Tensor) -> list:
        return torch.round(values.double(), decimals=12).tolist()

    if "ys" in items:
        return content_digest([items["prompt"].tolist(), items["ys"].tolist(), rounded(items["target"]),
                               rounded(items["base"])])
    return content_digest([items["prompt"].tolist(), items["y1"].tolist(), items["y0"].tolist(),
                           [round(float(v), 12) for v in items["label"]]])
