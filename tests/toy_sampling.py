"""A plain sampler of the toy reference for the tests: ``k`` seeded responses per prompt through the chat
template. The stages sample with alignment/sampling.py; this simpler one (no progress bar, no ``ended``
flags, one seed for all batches) checks the toy reference on its own, in tests/test_toy.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from alignment.worlds.toy import format_prompt


def sample_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    k: int,
    *,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
) -> list[list[str]]:
    """``k`` sampled responses per prompt (``out[i][j]`` is sample j of prompt i), decoded without specials.

    Prompts go through the chat template and are left-padded in batches of up to ``batch_size`` sequences;
    only newly generated tokens are decoded. ``temperature == 0`` means greedy decoding. Seeded through a
    forked torch RNG, so the caller's global RNG state is untouched and equal arguments give equal samples.
    """
    import torch

    if k < 1:
        raise ValueError("k must be >= 1")
    if tokenizer.padding_side != "left":
        raise ValueError("batched generation needs a left-padding tokenizer")
    flat = [format_prompt(tokenizer, p) for p in prompts for _ in range(k)]
    texts: list[str] = []
    was_training = model.training
    model.eval()
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        gen_kwargs.update(do_sample=False)
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(seed)
            for start in range(0, len(flat), batch_size):
                enc = tokenizer(
                    flat[start : start + batch_size],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                )
                out = model.generate(**enc, **gen_kwargs)
                new = out[:, enc["input_ids"].shape[1] :]
                texts.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]
