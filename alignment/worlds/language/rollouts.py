"""Online rollouts of a language policy being trained (Safe-RLHF's loop, alignment/online.py): fresh samples on
the dual's prompts, their log-probabilities under the policy and π_ref, and their scores. Never cached: the
policy changes every step."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from alignment.compute import ComputeMeter
from alignment.config import SamplingConfig
from alignment.sampling import Samples
from alignment.scorers import Scorer, score_all
from alignment.worlds.language.model import PolicyModel


class LanguageRollouts:
    """Rollouts on ``prompts`` (the dual's) with ``model``'s tokenizer and ``sampling``'s settings, scored by
    the world's scorers; the work is counted in the world's ``compute``."""

    def __init__(self, prompts: list[str], model: PolicyModel, sampling: SamplingConfig,
                 reward_scorer: Scorer, safety_scorers: Sequence[Scorer],
                 compute: ComputeMeter):
        self.prompts, self.model, self.sampling = prompts, model, sampling
        self.reward_scorer, self.safety_scorers = reward_scorer, list(safety_scorers)
        self.compute = compute

    def _flat(self, rows: np.ndarray, responses: list[list[str]]) -> tuple[list[str], list[str]]:
        """Each response with its prompt, flat: rows[i]'s prompt once per response of responses[i]."""
        return ([self.prompts[i] for i, row in zip(rows, responses) for _ in row],
                [y for row in responses for y in row])

    def rollout(self, model: nn.Module, rows: np.ndarray, k: int, generator: torch.Generator) -> Samples:
        from alignment.sampling import GenerationSpec, sample_responses

        s = self.sampling
        gen = GenerationSpec(num_samples=k, temperature=s.temperature, top_p=s.top_p,
                             max_new_tokens=s.max_new_tokens, batch_size=s.batch_size)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        # Always hf: the policy changes every step, in memory; an engine would need its weights pushed each step.
        responses = sample_responses(model, self.model.tokenizer, [self.prompts[i] for i in rows],
                                     gen, seed=seed, progress=False)
        self.compute.add(generated_tokens=self.model.response_tokens(responses, s.max_new_tokens),
                         policy_samples=len(rows) * k)
        return responses

    def rollout_logprob(self, model: nn.Module, rows: np.ndarray, responses: Samples) -> torch.Tensor:
        """log π(y|x) of a rollout's responses, [len(rows), k]: of the ids the policy drew."""
        from alignment.policies import prompt_logprob, shares_prompt

        flat_p = self._flat(rows, responses)[0]
        flat_y = responses.flat_ids()
        logp, tokens = prompt_logprob(model, self.model.tokenizer, flat_p, flat_y,
                                      max_length=self.model.config.max_length, share_prompt=shares_prompt(True),
                                      temperature=self.sampling.temperature)
        self.compute.add(forward_tokens=tokens, backward_tokens=tokens if torch.is_grad_enabled() else 0)
        return logp.double().reshape(len(rows), -1)

    @torch.no_grad()
    def rollout_ref_logprob(self, model: nn.Module, rows: np.ndarray, responses: Samples) -> torch.Tensor:
        with self.model.handle.reference():
            return self.rollout_logprob(model, rows, responses)

    def rollout_scores(self, rows: np.ndarray, responses: Samples) -> tuple[np.ndarray, np.ndarray]:
        flat_p, flat_y = self._flat(rows, responses)
        ended = getattr(responses, "ended", None)
        flat_e = None if ended is None else [e for row in ended for e in row]
        self.compute.add(scorer_calls=len(flat_y))
        reward, safety = score_all(self.reward_scorer, self.safety_scorers, flat_p, flat_y, flat_e)
        return reward.reshape(len(rows), -1), safety.reshape(len(rows), len(responses[0]), -1)
