"""Language-model policies: a causal LM with a LoRA adapter, whose reference is the same weights with the
adapter disabled.

    policy = load_policy(HFModelConfig(name_or_path="...", lora=LoraSpec(r=8)))
    logp = sequence_logprob(policy.model, policy.tokenizer, prompts, responses)        # log π_θ(y|x)
    with policy.reference():                                                           # log π_ref(y|x)
        ref = sequence_logprob(policy.model, policy.tokenizer, prompts, responses)

Log-probabilities are summed over the response tokens only; the prompt is formatted with the tokenizer's chat
template when it has one, so scoring, sampling and training all see the same text.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignment import distributed
from alignment.config import HFModelConfig

log = logging.getLogger(__name__)


@dataclass
class Policy:
    model: nn.Module  # a peft model when LoRA is configured
    tokenizer: Any
    has_adapter: bool

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """π_ref: the same weights with the LoRA adapter switched off (exact, no second copy in memory)."""
        if self.has_adapter:
            with self.model.disable_adapter():
                yield
        else:
            yield

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _check_local_or_cached(name_or_path: str) -> None:
    path = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or path.exists()
    if looks_local and not (path / "config.json").exists():
        raise FileNotFoundError(f"model.name_or_path: {name_or_path!r} has no config.json; pass a folder "
                                "written by save_pretrained, or a hub id")


def load_policy(cfg: HFModelConfig, *, adapter_path: str | Path | None = None, trainable: bool = True) -> Policy:
    """Load tokenizer and model; attach a fresh LoRA adapter (or load one from ``adapter_path``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_local_or_cached(cfg.name_or_path)
    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=getattr(torch, cfg.dtype), **kwargs)
    except OSError as err:
        raise FileNotFoundError(f"model.name_or_path: cannot load {cfg.name_or_path!r} ({err}). Download it "
                                "first (huggingface-cli download ... --local-dir DIR) and pass DIR.") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.chat_template is not None:
        tokenizer.chat_template = cfg.chat_template
    model.to(distributed.current().device(cfg.device))  # under a launcher, cuda is this rank's GPU
    has_adapter = cfg.lora is not None or adapter_path is not None
    with warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model: a
        # FutureWarning about peft's code that the user can do nothing about, once per policy.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        if adapter_path is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=trainable)
        elif cfg.lora is not None:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                              target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
            model = get_peft_model(model, lora)
    if not trainable:
        model.requires_grad_(False)
    model.eval()
    return Policy(model, tokenizer, has_adapter)


def format_prompt(tokenizer: Any, prompt: str) -> str:
    """The text the model sees before its response: the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def encode_pairs(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], *, max_length: int
                 ) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response token ids with a mask selecting the response tokens (and the EOS).

    Returns input_ids, attention_mask and response_mask, each [B, L]. The prompt is tokenised on its own so the
    boundary is exact; when a sequence exceeds ``max_length`` the response is truncated, never the prompt.
    """
    eos = tokenizer.eos_token_id
    rows, masks = [], []
    for prompt, response in zip(prompts, responses):
        p_ids = list(_token_ids(tokenizer, format_prompt(tokenizer, prompt)))
        r_ids = list(_token_ids(tokenizer, response))
        if eos is not None:
            r_ids = [*r_ids, eos]
        if not getattr(tokenizer, "chat_template", None) and tokenizer.bos_token_id is not None:
            p_ids = [tokenizer.bos_token_id, *p_ids]
        r_ids = r_ids[: max(max_length - len(p_ids), 1)]
        rows.append(p_ids + r_ids)
        masks.append([0] * len(p_ids) + [1] * len(r_ids))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, mask) in enumerate(zip(rows, masks)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        response_mask[i, : len(row)] = torch.tensor(mask, dtype=torch.bool)
    return {"input_ids": input_ids, "attention_mask": attention, "response_mask": response_mask}


@functools.lru_cache(maxsize=262144)
def _token_ids(tokenizer: Any, text: str) -> tuple[int, ...]:
    """Tokenisation memoised per (tokenizer, text): training revisits every text once per epoch."""
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_logprob_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ over response tokens of log p(token | prefix), [B]. Gradients flow when the caller enables them.

    Only positions from the earliest response token on go through the LM head: with a 49k-token vocabulary
    the head and its log-softmax are a quarter of a small model's training step, and prompt positions are
    masked out anyway. Exact: the kept logits are the same numbers.
    """
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    attention = batch["attention_mask"].to(device)
    mask = batch["response_mask"].to(device)
    first = int(mask.any(dim=0).nonzero()[0]) if mask.any() else ids.shape[1] - 1  # earliest response token
    keep = ids.shape[1] - first + 1  # hidden states first-1 .. L-1; the last predicts past the end
    kwargs = {"logits_to_keep": keep} if _accepts_logits_to_keep(model) else {}
    logits = model(input_ids=ids, attention_mask=attention, **kwargs).logits[:, -keep:-1].float()
    targets = ids[:, first:]
    # Fused log-softmax + gather: no [B, L, V] log-probability tensor is materialised.
    logp = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (logp * mask[:, first:]).sum(dim=-1)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the causal LM under any DDP or peft wrapper takes ``logits_to_keep`` (transformers >= 4.50 models do)."""
    model = getattr(model, "module", model)  # under DDP the wrapper's forward takes **kwargs
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _forward_takes_logits_to_keep(type(base))


@functools.lru_cache(maxsize=64)
def _forward_takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


@torch.no_grad()
def sequence_logprob(model: nn.Module, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], *,
                     batch_size: int = 16, max_length: int = 512) -> torch.Tensor:
    """log π(y|x) summed over response tokens for each (prompt, response), [B], in input order."""
    out = torch.empty(len(prompts), dtype=torch.float64)
    # Sort by length so each batch pads little; restore the order at the end.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = encode_pairs(tokenizer, [prompts[i] for i in idx], [responses[i] for i in idx],
                             max_length=max_length)
        out[idx] = token_logprob_sum(model, batch).double().cpu()
    return out
