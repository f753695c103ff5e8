"""Batched sampling of K responses per prompt from a causal LM, seeded and with a progress bar."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from alignment.policies import format_prompt


@dataclass
class GenerationSpec:
    num_samples: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    batch_size: int = 64  # sequences per generate() call (prompts x samples)


@torch.no_grad()
def sample_responses(model: Any, tokenizer: Any, prompts: Sequence[str], spec: GenerationSpec, *, seed: int,
                     desc: str = "sampling", progress: bool = True) -> list[list[str]]:
    """K = spec.num_samples responses for every prompt, [N][K] strings (new tokens only, special tokens
    stripped). Left padding so every row's generation starts at the same position.

    Seeded per batch (seed + batch index), so the samples do not depend on how many batches ran before, only
    on the batch size; the cache key of the samples includes both.
    """
    k = spec.num_samples
    per_call = max(spec.batch_size // k, 1)  # prompts per generate() call
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[list[str]] = []
    try:
        for b, start in enumerate(tqdm(range(0, len(prompts), per_call), desc=desc,
                                        disable=None if progress else True, leave=False)):
            chunk = prompts[start:start + per_call]
            texts = [format_prompt(tokenizer, p) for p in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True,
                            add_special_tokens=not getattr(tokenizer, "chat_template", None)).to(device)
            # top_k=0: generate() otherwise truncates to the model's default top-50, and the dual's samples must
            # come from π_ref itself. fork_rng leaves the caller's global RNG untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1_000_003 + b)
                generated = model.generate(
                    **enc, do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=0,
                    max_new_tokens=spec.max_new_tokens, num_return_sequences=k,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                )
            new = generated[:, enc["input_ids"].shape[1]:]
            decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
            out.extend([s.strip() for s in decoded[i * k:(i + 1) * k]] for i in range(len(chunk)))
    finally:
        tokenizer.padding_side = old_side
    return out
