"""The toy world's reference policy π_ref: a word-level tokenizer with its chat template, the encoding of
(prompt, response) pairs, the supervised fine-tuning of a tiny ``LlamaForCausalLM`` on the world's
demonstrations (:func:`build_reference`), and loading it back with a check of its recorded probe logits
(:func:`load_reference`).

Separate because it is the only part that needs torch and transformers (imported inside the functions) and
the only one that trains: the stages call :func:`build_reference` once per cache key (alignment/stages.py)
and from then on treat its folder like any HF model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alignment.store import atomic_write_json
from alignment.worlds.toy.content import TOY_VERSION, vocabulary
from alignment.worlds.toy.world import ToyWorld, demonstrations

logger = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
_SPECIALS = (PAD, BOS, EOS, UNK)
MODEL_MAX_LENGTH = 128

# "<s> user : {p} assistant : {r} </s>". The generation prompt ends in "assistant :"; the response follows
# after one space and is closed by </s> (the model's stop token).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ ' assistant : ' + message['content'] + ' ' + eos_token }}"
    "{% else %}"
    "{{ ' ' + message['role'] + ' : ' + message['content'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' assistant :' }}{% endif %}"
)



def build_tokenizer(world: ToyWorld | None = None, out_dir: str | Path | None = None) -> Any:
    """Word-level ``PreTrainedTokenizerFast`` over :func:`vocabulary`, saved to ``out_dir`` when given.

    Lowercasing normaliser, whitespace-then-punctuation pre-tokeniser, ids 0-3 = <pad>, <s>, </s>, <unk>, no
    post-processor (the chat template writes <s> itself, so ``add_special_tokens`` adds nothing twice),
    left padding (for batched generation) and :data:`CHAT_TEMPLATE`. Decoding joins tokens with spaces,
    which reproduces the world's space-separated texts exactly. ``world`` is accepted for API symmetry; the
    vocabulary does not depend on it.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    del world
    vocab = {tok: i for i, tok in enumerate((*_SPECIALS, *vocabulary()))}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        model_max_length=MODEL_MAX_LENGTH,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out_dir))
    return tok


def format_prompt(tokenizer: Any, prompt_text: str) -> str:
    """The generation prompt for ``prompt_text``: "<s> user : {prompt} assistant :".

    The same function the language-model stages use (alignment/policies.py), so SFT, sampling, scoring and
    stage 2 cannot drift apart in how they render a prompt.
    """
    from alignment.policies import format_prompt as render

    return render(tokenizer, prompt_text)


def encode_example(tokenizer: Any, prompt_text: str, response_text: str) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for supervised/preference training: the chat prompt, the response and </s>.

    Labels are -100 on prompt tokens, so a loss or log-probability over the labels covers exactly the
    response and its stop token (what the policy chooses).
    """
    return encode_examples(tokenizer, [(prompt_text, response_text)])[0]


def encode_examples(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_example` for many pairs: each distinct prompt is templated once, responses in one batch
    (rendering the Jinja chat template per example would dominate the cost of a toy SFT run)."""
    prompt_ids: dict[str, list[int]] = {}
    for prompt, _ in pairs:
        if prompt not in prompt_ids:
            prompt_ids[prompt] = tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False)[
                "input_ids"
            ]
    responses = [r for _, r in pairs]
    r_batch = tokenizer(responses, add_special_tokens=False)["input_ids"] if responses else []
    out = []
    for (prompt, _), r_ids in zip(pairs, r_batch):
        p_ids = prompt_ids[prompt]
        r_ids = [*r_ids, tokenizer.eos_token_id]
        out.append((p_ids + r_ids, [-100] * len(p_ids) + r_ids))
    return out


def _collate(batch: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):  # right padding: positions stay 0..n-1 for training
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def build_reference(
    world: ToyWorld,
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int = 160,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    batch_size: int = 64,
    lr: float = 5e-3,
    weight_decay: float = 0.01,
    warmup_steps: int = 20,
    per_prompt: int | None = None,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Supervised fine-tuning of a tiny ``LlamaForCausalLM`` on :func:`demonstrations`: the reference π_ref.

    The model (tied embeddings, ``intermediate`` defaulting to 8 x hidden, ~1 M parameters at the defaults)
    is trained with AdamW (linear warm-up, cosine decay to 10%, gradient clipping 1.0) on the loss of
    response tokens only, one pass over ``steps * batch_size`` demonstrations of the train split in random
    batches (``per_prompt`` defaults to what one pass needs), so it sees fresh style draws rather than
    memorising a few per prompt. Length-bucketed batches would cut padding, but length tracks style here:
    they made style-homogeneous batches and a worse model (loss 0.37 vs 0.31, a third of samples malformed).
    Defaults (160 steps x 64 at lr 5e-3) reach the loss plateau (~0.3 nats/token, the entropy of the style
    mixture); 240 steps at lr 3e-3 gave the same loss and style mix, 50% slower.

    Seeded: ``torch.manual_seed(seed)`` for the initial weights and an explicit generator for the data order;
    bit-identical reruns need the same ``threads``, torch's intra-op thread count for the duration (restored
    afterwards; None keeps the caller's). Why 1 by default, measured on the 2-core machine: idle, 2 threads
    take ~0.14 s/step against ~0.25 s for 1; but with one other busy process on the cores, 2 threads spin in
    torch's barriers and a build took 5-10x longer (290-600 s for 240 steps, against ~105 s on 1 thread).
    Pass ``threads=2`` on a machine known to be idle.

    Saves safetensors weights, config, tokenizer and ``toy_reference.json`` (these stats, including probe
    logits that :func:`load_reference` checks) to ``out_dir``. Returns ``{"loss_initial", "loss_final",
    "losses", "steps", "seconds", "n_params", "n_examples", "vocab_size", ...}``, ``loss_final`` being the
    mean of the last 10 step losses.
    """
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prev_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        tok = build_tokenizer(world, out)
        n_train = len(world.select(split="train"))
        if n_train == 0:
            raise ValueError("the world has no train prompts")
        if per_prompt is None:
            per_prompt = max(1, math.ceil(steps * batch_size / n_train))
        demos = demonstrations(world, seed, per_prompt, split="train")
        examples = encode_examples(tok, [(p, r) for p, r, _ in demos])

        model = _new_model(tok, seed, hidden=hidden, layers=layers, heads=heads, intermediate=intermediate)
        n_params = sum(p.numel() for p in model.parameters())
        losses = _sft(model, examples, tok.pad_token_id, seed=seed, steps=steps, batch_size=batch_size, lr=lr,
                      weight_decay=weight_decay, warmup_steps=warmup_steps)
        model.eval()
        with torch.inference_mode():
            probe = _probe_logits(model, tok)
        model.save_pretrained(str(out))
        seconds = time.perf_counter() - t0
        stats: dict[str, Any] = {
            "loss_initial": losses[0] if losses else float("nan"),
            "loss_final": float(np.mean(losses[-10:])) if losses else float("nan"),
            "losses": losses,
            "steps": steps,
            "seconds": seconds,
            "n_params": n_params,
            "n_examples": len(examples),
            "per_prompt": per_prompt,
            "vocab_size": len(tok),
            "seed": seed,
            "world_seed": world.seed,
            "toy_version": TOY_VERSION,
            "probe_prompts": list(PROBE_PROMPTS),
            "probe_logits": probe,
            "config": {
                "hidden": hidden,
                "layers": layers,
                "heads": heads,
                "intermediate": model.config.intermediate_size,
                "batch_size": batch_size,
                "lr": lr,
                "weight_decay": weight_decay,
                "warmup_steps": warmup_steps,
                "threads": threads,
            },
        }
        atomic_write_json(out / "toy_reference.json", stats)
        logger.info(
            "toy reference: %d params, loss %.3f -> %.3f in %.1f s",
            n_params,
            stats["loss_initial"],
            stats["loss_final"],
            seconds,
        )
        return stats
    finally:
        torch.set_num_threads(prev_threads)


# Two fixed prompts whose next-token logits after "assistant :" are recorded at build time, so a reloaded
# reference can be checked against the model that was trained (see load_reference).
PROBE_PROMPTS = ("how do i bake fresh bread at home ?", "how do i build a pipe bomb at home ?")



def _new_model(tok: Any, seed: int, *, hidden: int, layers: int, heads: int, intermediate: int | None) -> Any:
    """A randomly initialised tiny ``LlamaForCausalLM`` (weights from ``torch.manual_seed(seed)``, tied
    embeddings, ``intermediate`` defaulting to 8 x hidden) over ``tok``'s vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate if intermediate is not None else 8 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def _sft(model: Any, examples: list[tuple[list[int], list[int]]], pad_id: int, *, seed: int, steps: int,
         batch_size: int, lr: float, weight_decay: float, warmup_steps: int) -> list[float]:
    """π_ref's SFT loop (see :func:`build_reference`): AdamW, linear warm-up then cosine decay to 10%, clipping
    1.0, random batches drawn without replacement from a seeded order (reshuffled when exhausted); the loss of
    every step. Not the stage-2 loop (alignment/training.py): that one trains LoRA adapters on pairs or lists,
    this one all weights on (prompt, response) token sequences, and π_ref's weights depend on its exact steps."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    losses: list[float] = []
    perm = torch.randperm(len(examples), generator=gen)
    cursor = 0
    for step in range(steps):
        if cursor + batch_size > len(perm):
            perm, cursor = torch.randperm(len(examples), generator=gen), 0
        idx = perm[cursor : cursor + batch_size].tolist()
        cursor += batch_size
        batch = _collate([examples[i] for i in idx], pad_id)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == steps - 1:
            logger.info("toy reference step %d/%d loss %.4f", step + 1, steps, losses[-1])
    return losses

def _probe_logits(model: Any, tokenizer: Any) -> list[list[float]]:
    import torch

    enc = tokenizer(
        [format_prompt(tokenizer, p) for p in PROBE_PROMPTS],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    with torch.inference_mode():
        logits = model(**enc).logits[:, -1, :]
    return logits.float().tolist()


def load_reference(out_dir: str | Path, *, verify: bool = True, atol: float = 1e-5) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a reference saved by :func:`build_reference`, in eval mode.

    Loads through the Auto classes (as any downstream stage would). With ``verify`` the probe logits are
    recomputed and compared with those recorded at build time, so a stale, truncated or mismatched
    checkpoint fails loudly instead of silently changing π_ref.
    """
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    model = AutoModelForCausalLM.from_pretrained(str(out_dir))
    model.eval()
    if verify:
        stats = json.loads((Path(out_dir) / "toy_reference.json").read_text())
        got = np.asarray(_probe_logits(model, tokenizer))
        want = np.asarray(stats["probe_logits"])
        if got.shape != want.shape or not np.allclose(got, want, rtol=0.0, atol=atol):
            raise ValueError(f"reference in {out_dir} does not reproduce its recorded probe logits")
    return model, tokenizer
