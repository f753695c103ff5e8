"""Language-model policies: a causal LM with a LoRA adapter, whose reference is the same weights with the
adapter disabled.

    policy = load_policy(HFModelConfig(name_or_path="...", lora=LoraSpec(r=8)))
    logp = sequence_logprob(policy.model, policy.tokenizer, prompts, responses)        # log π_θ(y|x)
    with policy.reference():                                                           # log π_ref(y|x)
        ref = sequence_logprob(policy.model, policy.tokenizer, prompts, responses)

Log-probabilities are summed over the response tokens only; the prompt is formatted with the tokenizer's chat
template when it has one, so scoring, sampling and training all see the same text. A response is either a text
(a complete answer: tokenised on its own, EOS appended) or the token ids a model generated, taken as they are
(:data:`Response`): a sample's log-probability is that of the tokens drawn, never of its decoded text re-encoded.
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

# A response: a text, which is a complete answer (tokenised, + EOS), or the ids a model generated, as they are
# (up to and including the EOS where it ended; alignment/sampling.py's ``Samples.token_ids``).
# Log-probabilities take a ``temperature`` T: a policy sampled at T is softmax(logits / T) token by token, and
# that is the distribution whose log-probabilities, ratios and KL the method needs (T = 1: the raw model).
Response = str | tuple[int, ...]


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


def response_token_ids(tokenizer: Any, response: Response) -> list[int]:
    """The ids a response is scored as: a generated response's own ids; a text's tokens + EOS (a complete
    answer, e.g. a dataset's)."""
    if not isinstance(response, str):
        return list(response)
    r_ids = list(_token_ids(tokenizer, response))
    return [*r_ids, tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else r_ids


def prompt_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The ids a response is generated after and scored after: the formatted prompt tokenised on its own, with
    BOS in front when there is no chat template (a template writes its own). Sampling and every log-probability
    use this one function, so a sample is scored after exactly the tokens it was drawn after."""
    ids = list(_token_ids(tokenizer, format_prompt(tokenizer, prompt)))
    if not getattr(tokenizer, "chat_template", None) and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def _pair_ids(tokenizer: Any, prompt: str, response: Response, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (:func:`prompt_token_ids`) and of the response (:func:`response_token_ids`); a
    pair longer than ``max_length`` loses the end of its response, never the prompt."""
    p_ids = prompt_token_ids(tokenizer, prompt)
    return p_ids, response_token_ids(tokenizer, response)[: max(max_length - len(p_ids), 1)]


def padded(rows: Sequence[Sequence[int]], pad: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids padded to the longest, [B, L], with the mask of real tokens (bool). Right padding keeps
    each row's start at position 0; left padding (``left``) ends every row at the same position, where its
    continuation (a response, a generation) starts."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        if row:
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = True
    return ids, mask


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def encode_pairs(tokenizer: Any, prompts: Sequence[str], responses: Sequence[Response], *, max_length: int
                 ) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response token ids with a mask selecting the response tokens (and the EOS).

    Returns input_ids, attention_mask and response_mask, each [B, L]. The prompt is tokenised on its own so the
    boundary is exact; when a sequence exceeds ``max_length`` the response is truncated, never the prompt.
    """
    pairs = [_pair_ids(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)]
    input_ids, attention = padded([p + r for p, r in pairs], _pad_id(tokenizer))
    response_mask = torch.zeros_like(attention)
    for i, (p_ids, r_ids) in enumerate(pairs):
        response_mask[i, len(p_ids): len(p_ids) + len(r_ids)] = True
    return {"input_ids": input_ids, "attention_mask": attention.long(), "response_mask": response_mask}


def encode_groups(tokenizer: Any, prompts: Sequence[str], responses: Sequence[Response], *, max_length: int
                  ) -> dict[str, torch.Tensor]:
    """Pairs (prompts[i], responses[i]) laid out for :func:`groups_logprob_sum`: each distinct prompt once,
    left-padded, prompt_ids and prompt_mask [G, P]; the responses right-padded, response_ids and response_mask
    [B, R]; group [B], the row of each response's prompt (tokens as :func:`encode_pairs` makes them)."""
    row_of: dict[str, int] = {}
    group = torch.tensor([row_of.setdefault(p, len(row_of)) for p in prompts], dtype=torch.long)
    pairs = [_pair_ids(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)]
    prompt_rows: list[list[int]] = [[] for _ in row_of]
    for g, (p_ids, _) in zip(group.tolist(), pairs):
        prompt_rows[g] = p_ids
    prompt_ids, prompt_mask = padded(prompt_rows, _pad_id(tokenizer), left=True)  # ending where responses start
    prompt_mask = prompt_mask.long()
    response_ids, response_mask = padded([r for _, r in pairs], _pad_id(tokenizer))
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids,
            "response_mask": response_mask, "group": group}


def group_tokens(enc: dict[str, torch.Tensor]) -> int:
    """Tokens a :func:`groups_logprob_sum` call processes: each prompt once, then each response."""
    return int(enc["prompt_mask"].sum() + enc["response_mask"].sum())


@functools.lru_cache(maxsize=262144)
def _token_ids(tokenizer: Any, text: str) -> tuple[int, ...]:
    """Tokenisation memoised per (tokenizer, text): training revisits every text once per epoch."""
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_logprob_sum(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Σ over response tokens of log p_T(token | prefix), [B], p_T = softmax(logits / T) (the policy sampled at
    temperature T: :data:`Response`). Gradients flow when the caller enables them.

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
    logits = model(input_ids=ids, attention_mask=attention, **kwargs).logits[:, -keep:-1].float() / temperature
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


def prompt_forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    """One forward of left-padded prompts [G, P] that keeps their keys and values (``.cache``), with the
    position ids generate() gives them (real tokens counted from 0) and logits for the last position only
    where the model takes ``logits_to_keep``. Responses or samples then run on top of the cache."""
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    kwargs = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)


def groups_logprob_sum(model: nn.Module, enc: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Σ over response tokens of log p(token | prompt, earlier tokens) for each response of
    :func:`encode_groups`, [B]: the numbers :func:`token_logprob_sum` gives for the flat pairs, with each
    distinct prompt run once.

    Two forwards: the prompts (left-padded, with the position ids generate() would give them), keeping their
    keys and values; those are gathered to one row per response and the responses run on top of them (their
    right padding is harmless: a padded position comes after every real one and the causal mask hides it).
    K samples of a prompt (lists, pairs) share it, so the prompt's cost is paid once instead of K times: on the
    default world's 8 samples of 32 tokens after a ~40-token chat prompt that is about half the tokens of a
    flat batch. Gradients flow through both forwards, into the prompts' keys and values too, when the caller
    enables them. The same float32 math summed in another order: equal to the flat path to rounding (tested).
    """
    device = next(model.parameters()).device
    prompt, prompt_mask = enc["prompt_ids"].to(device), enc["prompt_mask"].to(device)
    ids, mask, group = enc["response_ids"].to(device), enc["response_mask"].to(device), enc["group"].to(device)
    b, width = ids.shape
    if width == 0:
        return torch.zeros(b, device=device)
    head = prompt_forward(model, prompt, prompt_mask)
    first = (head.logits[:, -1].float() / temperature).log_softmax(-1)[group, ids[:, 0]]  # each first token
    cache = head.cache  # (transformers 5.x names the key-value cache ``cache``, formerly ``past_key_values``)
    cache.batch_select_indices(group)  # one row per response
    attention = torch.cat([prompt_mask[group], torch.ones_like(ids)], dim=1)
    positions = prompt_mask.sum(-1, keepdim=True)[group] + torch.arange(width, device=device)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, cache=cache,
                   use_cache=True).logits[:, :-1].float() / temperature
    # Fused log-softmax + gather: no [B, R, V] log-probability tensor is materialised.
    rest = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return first * mask[:, 0] + (rest * mask[:, 1:]).sum(dim=-1)


def prompt_logprob(model: nn.Module, tokenizer: Any, prompts: Sequence[str], responses: Sequence[Response], *,
                   max_length: int, batch_size: int | None = None, share_prompt: bool = True,
                   temperature: float = 1.0) -> tuple[torch.Tensor, int]:
    """log π(y|x) summed over response tokens for each (prompt, response), [B] float32 in input order, and the
    tokens processed, ``batch_size`` pairs at a time (all at once: None). ``share_prompt``: each distinct
    prompt of a batch run once (:func:`groups_logprob_sum`); else every pair as its own sequence
    (:func:`token_logprob_sum`). Differentiable when the caller enables gradients."""
    size = batch_size or max(len(prompts), 1)
    parts, tokens = [], 0
    for start in range(0, len(prompts), size):
        ps, ys = prompts[start:start + size], responses[start:start + size]
        if share_prompt:
            enc = encode_groups(tokenizer, ps, ys, max_length=max_length)
            parts.append(groups_logprob_sum(model, enc, temperature))
            tokens += group_tokens(enc)
        else:
            enc = encode_pairs(tokenizer, ps, ys, max_length=max_length)
            parts.append(token_logprob_sum(model, enc, temperature))
            tokens += int(enc["attention_mask"].sum())
    return (torch.cat(parts) if parts else torch.zeros(0)), tokens


def shares_prompt(requested: bool) -> bool:
    """Whether a training forward may run each prompt once for its responses (``trainer.share_prompt``).
    Not under a multi-process launch: there every forward is a collective (DDP's buffer broadcast, FSDP's and
    ZeRO-3's parameter gathers), so every rank must make the same number of forwards per micro-batch, and the
    number of distinct prompts in a rank's share varies. Each micro-batch is then one flat forward."""
    return requested and not distributed.current().enabled


LOGPROB_BATCH = 32  # pairs per forward in sequence_logprob


@torch.no_grad()
def sequence_logprob(model: nn.Module, tokenizer: Any, prompts: Sequence[str], responses: Sequence[Response], *,
                     batch_size: int = LOGPROB_BATCH, max_length: int = 512, temperature: float = 1.0
                     ) -> torch.Tensor:
    """log π(y|x) summed over response tokens for each (prompt, response), [B] float64, in input order
    (:func:`prompt_logprob`: each distinct prompt of a batch run once). Pairs are taken in input order: callers
    pass a prompt's responses together (the world's [N, K] samples), so a batch holds few prompts."""
    logp, _ = prompt_logprob(model, tokenizer, prompts, responses, max_length=max_length, batch_size=batch_size,
                             temperature=temperature)
    return logp.double().cpu()
