"""Reward / cost score models (Beaver) loaded with plain transformers, without the safe-rlhf package.

The paper scores responses with the Beaver-7B-v1.0 reward model r(x, y) (helpfulness, higher is better) and
cost model c(x, y) (harmfulness, lower is safer); the safety "utility" used in the constraint is g = -c. Both
checkpoints were written by safe-rlhf's ``LlamaForScore`` (called ``LlamaModelForScore`` in its first commits,
with the same weights):

* ``config.json``: ``"architectures": ["LlamaForScore"]``, ``"model_type": "llama"`` plus ``score_dim`` (1), the
  head's bias flag, ``score_type`` ("reward" / "cost") and optionally ``do_normalize``, ``normalizer_type``,
  ``momentum``, ``mean``, ``var``. The bias flag was ``bias`` (default false) in safe-rlhf's early releases and is
  ``score_bias`` (default true) today; a config re-saved by today's safe-rlhf can hold both, and then
  ``score_bias`` is the one the weights were written with;
* weights: a ``LlamaModel`` backbone under ``model.*``, a linear head ``score_head.weight`` of shape
  ``[score_dim, hidden]`` and, when the flag is set, usually ``score_head.bias`` (safe-rlhf zero-initialises the
  bias, so a checkpoint without the tensor scores as with a zero bias), optionally the normaliser buffers
  ``normalizer.{mean,var,count}`` and, in checkpoints saved by transformers < 4.31, the deterministic
  ``model.layers.*.self_attn.rotary_emb.inv_freq`` buffers.

Forward pass (safe-rlhf semantics): last hidden states ``[B, L, E]`` -> ``score_head`` -> per-token scores
``[B, L, D]``; the sequence score (``end_scores``, ``[B, D]``) is the per-token score at the last position whose
attention mask is 1, i.e. the last real token. Using the mask (not a pad-token id) keeps the score correct when
the pad token equals EOS, and position ids are counted over real tokens only, so with right or left padding a
text's score does not depend on what else is in its batch.

Loading is strict: any checkpoint weight that does not land in the model, and any model weight that is not in the
checkpoint, raises. A silently re-initialised score head would produce plausible-looking random rewards.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaModel,
    LlamaPreTrainedModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers import initialization as hf_init
from transformers.utils import ModelOutput

__all__ = [
    "BEAVER_ARCHITECTURES",
    "BEAVER_TEMPLATE",
    "LlamaForScore",
    "ScoreLoadingError",
    "ScoreModelOutput",
    "format_beaver",
    "load_score_model",
    "score_texts",
]

BEAVER_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}"

# safe-rlhf's class names for the same layout: ``LlamaModelForScore`` in its first commits (the first beaver
# checkpoints), ``LlamaForScore`` since.
BEAVER_ARCHITECTURES = ("LlamaForScore", "LlamaModelForScore")
_SCORE_TYPE_TO_NORMALIZE_FUNCTION = {"reward": "affine", "cost": "scale", "critic": "identity"}
_NORMALIZER_TYPES = {None, "RunningMeanStd", "ExponentialMovingAverage"}


def format_beaver(prompt: str, response: str) -> str:
    """Render one (prompt, response) pair in the single-turn conversation format the Beaver models were trained on.

    Note there is a space after ``USER:`` but none after ``ASSISTANT:`` (safe-rlhf's template); the tokenizer adds
    BOS itself, so it is not part of the string.
    """
    return BEAVER_TEMPLATE.format(prompt=prompt, response=response)


def _score_head_bias(config: Any) -> bool:
    """Whether the score head has a bias, read the way safe-rlhf reads it.

    Today's safe-rlhf reads ``score_bias`` (default true); its early releases, which wrote the Beaver-7B-v1.0
    checkpoints, read ``bias`` (default false). ``score_bias`` wins when both are present because a config
    re-saved by today's safe-rlhf keeps the stale ``bias`` key while its weights follow ``score_bias``. With
    neither key, today's default (true) is used: it is harmless for a checkpoint without a bias tensor, since a
    missing bias loads as zero (see :class:`LlamaForScore`).
    """
    for key in ("score_bias", "bias"):
        value = getattr(config, key, None)
        if value is not None:
            if not isinstance(value, bool):
                raise ValueError(
                    f"config.{key}={value!r} must be true or false (the score head's bias flag)."
                )
            return value
    return True


class ScoreLoadingError(RuntimeError):
    """The checkpoint's weights do not match the model: missing, unexpected or mis-shaped tensors."""


@dataclass
class ScoreModelOutput(ModelOutput):
    """Output of :class:`LlamaForScore`.

    scores: ``[B, L, D]`` float32 per-token scores (padding positions hold meaningless values).
    end_scores: ``[B, D]`` float32 score at each sequence's last real token; this is the reward / cost.
    end_index: ``[B]`` int64 position of that token.
    """

    scores: torch.Tensor | None = None
    end_scores: torch.Tensor | None = None
    end_index: torch.Tensor | None = None


class ScoreNormalizer(nn.Module):
    """Inference-only counterpart of safe-rlhf's score normaliser.

    Holds the ``mean`` / ``var`` (``[D]``) and ``count`` (``[1]``) buffers so that checkpoints which saved them
    load without unexpected keys. The statistics are never updated here (we only score); they are applied only
    when the config says ``do_normalize: true``, with the function fixed by ``score_type``:
    reward -> (s - mean) / std, cost -> s / std, critic -> s.
    """

    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor

    def __init__(self, score_dim: int, normalize_function: str) -> None:
        super().__init__()
        self.normalize_function = normalize_function
        self.register_buffer("mean", torch.zeros(score_dim))
        self.register_buffer("var", torch.ones(score_dim))
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))

    def normalize(self, data: torch.Tensor, epsilon: float = 1e-8) -> torch.Tensor:
        """Normalise ``data`` (``[..., D]``) with the stored statistics; returns the same shape."""
        mean = self.mean.to(data)
        std = self.var.to(data).sqrt()
        if self.normalize_function == "affine":
            return (data - mean) / (std + epsilon)
        if self.normalize_function == "scale":
            return data / (std + epsilon)
        return data


class LlamaForScore(LlamaPreTrainedModel):
    """safe-rlhf's ``LlamaForScore`` (Beaver reward / cost models): a Llama backbone plus a linear score head.

    Parameter names match the safe-rlhf checkpoints exactly (``model.*``, ``score_head.*``, ``normalizer.*``),
    so ``LlamaForScore.from_pretrained(path, dtype=torch.bfloat16)`` loads them with the stock transformers
    loader (safetensors, sharded or not, and ``pytorch_model*.bin``). ``from_pretrained`` is strict: it raises
    :class:`ScoreLoadingError` when weights are missing, unexpected or mis-shaped.
    """

    # The normaliser buffers are optional in checkpoints (their defaults are the identity statistics, and they
    # only matter with do_normalize). The head's bias is optional too: safe-rlhf zero-initialises it, so a
    # checkpoint with score_bias true but no bias tensor scores with a zero bias (set in _init_weights); the
    # weight stays required, a missing weight would be a random head. Old checkpoints carry per-layer rotary
    # inv_freq buffers, which are a deterministic function of the config and recomputed by LlamaModel.
    _keys_to_ignore_on_load_missing: ClassVar[list[str]] = [
        r"^normalizer\.(mean|var|count)$",
        r"^score_head\.bias$",
    ]
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [r"rotary_emb\.inv_freq$"]

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.model = LlamaModel(config)

        score_dim = int(getattr(config, "score_dim", 1))
        bias = _score_head_bias(config)
        score_type = getattr(config, "score_type", "reward")
        if score_type not in _SCORE_TYPE_TO_NORMALIZE_FUNCTION:
            raise ValueError(
                f"config.score_type={score_type!r} is not one of {sorted(_SCORE_TYPE_TO_NORMALIZE_FUNCTION)}."
            )
        normalizer_type = getattr(config, "normalizer_type", None)
        if normalizer_type not in _NORMALIZER_TYPES:
            raise ValueError(f"config.normalizer_type={normalizer_type!r} is not one of {_NORMALIZER_TYPES}.")
        self.do_normalize = bool(getattr(config, "do_normalize", False))

        self.score_head = nn.Linear(config.hidden_size, score_dim, bias=bias)
        self.normalizer = ScoreNormalizer(score_dim, _SCORE_TYPE_TO_NORMALIZE_FUNCTION[score_type])
        self._config_mean_var = (getattr(config, "mean", None), getattr(config, "var", None))
        self._set_normalizer_from_config()
        self.post_init()

    def _normalizer_defaults(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, var)`` defaults ``[D]``: safe-rlhf mirrors its statistics into config.json, else 0 / 1."""
        score_dim = self.score_head.out_features
        mean, var = self._config_mean_var
        mean_t = torch.zeros(score_dim) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        var_t = torch.ones(score_dim) if var is None else torch.as_tensor(var, dtype=torch.float32)
        return mean_t.reshape(score_dim), var_t.reshape(score_dim)

    def _set_normalizer_from_config(self) -> None:
        mean, var = self._normalizer_defaults()
        if self.normalizer.mean.device.type != "meta":
            with torch.no_grad():
                self.normalizer.mean.copy_(mean)
                self.normalizer.var.copy_(var)

    def _init_weights(self, module: nn.Module) -> None:
        """Llama init for the backbone and head; normaliser buffers absent from the checkpoint get the defaults.

        transformers calls this only for tensors the checkpoint did not provide (the ``transformers.initialization``
        functions skip tensors flagged as loaded), so loaded statistics are never overwritten. A head bias absent
        from the checkpoint is zero, as safe-rlhf initialises it (and Llama's generic init would do by accident).
        """
        if isinstance(module, ScoreNormalizer):
            mean, var = self._normalizer_defaults()
            hf_init.copy_(module.mean, mean.to(module.mean))
            hf_init.copy_(module.var, var.to(module.var))
            hf_init.zeros_(module.count)
            return
        super()._init_weights(module)
        if module is getattr(self, "score_head", None) and module.bias is not None:
            hf_init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> None:
        return None

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, *model_args: Any, **kwargs: Any
    ) -> Any:
        """``PreTrainedModel.from_pretrained`` that raises :class:`ScoreLoadingError` on any key mismatch.

        Returns the model (or ``(model, loading_info)`` when ``output_loading_info=True``).
        """
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        _check_loading_info(info, str(pretrained_model_name_or_path))
        # Normaliser statistics stay float32 under dtype=bfloat16 / float16 (bf16 would round them to 3 digits).
        model.normalizer.float()
        return (model, info) if want_info else model

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ScoreModelOutput:
        """Score sequences.

        input_ids: ``[B, L]`` token ids (or ``inputs_embeds`` ``[B, L, E]``).
        attention_mask: ``[B, L]``, 1 for real tokens, right or left padding; ``None`` means no padding. The end
            token is the last position with mask 1.
        position_ids: ``[B, L]``; by default each real token's index among the real tokens of its row, so a left-
            padded sequence gets the same rotary positions (and scores) as unpadded (right padding: 0..L-1).
        Returns :class:`ScoreModelOutput` with ``scores`` ``[B, L, D]`` and ``end_scores`` ``[B, D]`` (float32).
        """
        kwargs.pop("use_cache", None)
        kwargs.pop("return_dict", None)
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            # Without this a left-padded row would start its real tokens at position (number of pads); RoPE is
            # relative in exact arithmetic only, so the score would drift with the batch's padding.
            mask_long = attention_mask.long()
            position_ids = (mask_long.cumsum(dim=1) - 1).clamp(min=0)  # [B, L]
        hidden = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            **kwargs,
        ).last_hidden_state  # [B, L, E]
        scores = self.score_head(hidden).float()  # [B, L, D]
        batch, length = hidden.shape[:2]
        if attention_mask is None:
            end_index = torch.full((batch,), length - 1, dtype=torch.long, device=hidden.device)
        else:
            mask = attention_mask.to(hidden.device).bool()
            if not bool(mask.any(dim=1).all()):
                raise ValueError("Every sequence needs at least one token with attention_mask == 1.")
            positions = torch.arange(length, device=hidden.device)
            # Last position with mask 1 (argmax of position * mask); works for right or left padding.
            end_index = (positions * mask).argmax(dim=1)  # [B]
        end_scores = scores[torch.arange(batch, device=hidden.device), end_index]  # [B, D]
        if self.do_normalize:
            scores = self.normalizer.normalize(scores)
            end_scores = self.normalizer.normalize(end_scores)
        return ScoreModelOutput(scores=scores, end_scores=end_scores, end_index=end_index)


def _check_loading_info(info: dict[str, Any], path: str) -> None:
    """Raise :class:`ScoreLoadingError` if ``from_pretrained`` reported any weight mismatch."""
    problems = []
    for field in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(field) or ())
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} total)" if len(keys) > 8 else "")
            problems.append(f"{field.replace('_', ' ')}: {shown}")
    if info.get("error_msgs"):
        problems.append("errors: " + "; ".join(str(m) for m in info["error_msgs"]))
    if problems:
        raise ScoreLoadingError(
            f"Checkpoint {path!r} does not match the score model architecture ("
            + "; ".join(problems)
            + "). Refusing to score with partially random weights."
        )


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16' or 'auto'.")
    return resolved


_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _resolve_checkpoint_dir(path: str | Path) -> Path:
    """A local directory, or a hub id already in the local Hugging Face cache (never downloads: 7B = 13 GB)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    repo = str(path) if _REPO_ID.match(str(path)) else "PKU-Alignment/beaver-7b-v1.0-reward"
    hint = (
        f"Score model checkpoint {str(path)!r} not found: it is not an existing local directory"
        " and not in the local Hugging Face cache. Download it first, e.g."
        f" `huggingface-cli download {repo} --local-dir <dir>`, and pass that local directory."
    )
    if local.exists():
        raise NotADirectoryError(f"{hint} ({str(path)!r} exists but is a file, not a checkpoint directory.)")
    if not _REPO_ID.match(str(path)):
        raise FileNotFoundError(hint)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=str(path), local_files_only=True))
    except Exception as err:  # any hub/cache failure means "not available locally"
        raise FileNotFoundError(hint) from err


def load_score_model(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a scalar score model and its tokenizer, in eval mode on ``device``.

    ``path`` is a checkpoint directory (or a hub id already in the local HF cache). If its config.json lists
    ``LlamaForScore`` or ``LlamaModelForScore`` (Beaver reward / cost) the safe-rlhf layout is used; otherwise
    the checkpoint must be an ``AutoModelForSequenceClassification`` with ``num_labels == 1`` (a scalar reward
    model). Loading is strict (:class:`ScoreLoadingError` on missing / unexpected weights). For sequence-
    classification models without a ``pad_token_id`` in the config, the tokenizer's pad (or EOS) id is set,
    because those models locate the last token via the pad id and refuse batches otherwise.
    """
    ckpt = _resolve_checkpoint_dir(path)
    config_file = ckpt / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no config.json; is it a complete model checkpoint directory?"
        )
    raw_config = json.loads(config_file.read_text())
    torch_dtype = _resolve_dtype(dtype)

    model: PreTrainedModel
    if set(BEAVER_ARCHITECTURES) & set(raw_config.get("architectures") or []):
        model = LlamaForScore.from_pretrained(str(ckpt), dtype=torch_dtype)
    else:
        config = AutoConfig.from_pretrained(str(ckpt), trust_remote_code=trust_remote_code)
        if getattr(config, "num_labels", None) != 1:
            raise ValueError(
                f"{str(path)!r} is not a scalar score model: config num_labels={getattr(config, 'num_labels', None)}"
                f" (architectures {raw_config.get('architectures')}); expected a LlamaForScore checkpoint or a"
                " sequence-classification reward model with num_labels == 1."
            )
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(ckpt), dtype=torch_dtype, trust_remote_code=trust_remote_code, output_loading_info=True
        )
        _check_loading_info(info, str(path))

    tokenizer = AutoTokenizer.from_pretrained(str(ckpt), trust_remote_code=trust_remote_code)
    if not isinstance(model, LlamaForScore) and model.config.pad_token_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is not None:
            model.config.pad_token_id = pad_id
    model.to(device)
    model.eval()
    return model, tokenizer


def _pad_id(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> int:
    """Id used to fill padding positions (their value is irrelevant to LlamaForScore, which uses the mask)."""
    if not isinstance(model, LlamaForScore):
        config_pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        if config_pad is not None:
            return int(config_pad)
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    if isinstance(model, LlamaForScore):
        return 0
    raise ValueError("Tokenizer has neither a pad nor an EOS token and model.config.pad_token_id is unset.")


@torch.no_grad()
def _batch_end_scores(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Sequence scores ``[B]`` (column 0) from a LlamaForScore or a sequence-classification model."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    end_scores = getattr(out, "end_scores", None)
    if end_scores is None:
        end_scores = out.logits  # [B, num_labels]; pooled at the last non-pad token by the model itself
    return end_scores[:, 0].float()


def score_texts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    append_eos: bool | Sequence[bool] = False,
) -> torch.Tensor:
    """Score full texts (already formatted, e.g. with :func:`format_beaver`); returns float32 ``[N]`` on CPU.

    Texts are tokenised once (special tokens as the tokenizer adds them, e.g. Llama's BOS), sorted by length
    (longest first, so padding is minimal and an out-of-memory shows up in the first batch) and scored in
    batches of ``batch_size`` with right padding to the batch's longest sequence; results are returned in input
    order. ``max_length`` truncates each text to that many tokens on the tokenizer's ``truncation_side`` (note
    that right truncation cuts the end of the response, where the score is read). The model's train/eval mode
    is restored afterwards; scoring runs in eval mode.

    ``append_eos`` adds the tokenizer's EOS id to the token ids (never the EOS string to the text, which may
    tokenise differently), so the score is read at the EOS position: ``True`` for every text, ``False`` for
    none, or one flag per text (``[N]``, e.g. True for responses whose generation stopped at EOS, False for
    those cut at ``max_new_tokens``). safe-rlhf trained its score models on ``prompt + response + eos`` and
    the paper's code scores the generated ids, which end with EOS when generation stopped (its README example
    scores without it). A sequence that already ends with EOS gets no second one; with ``max_length`` an
    appended EOS replaces the last kept token when the sequence would exceed it.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    texts = list(texts)
    if not texts:
        return torch.empty(0, dtype=torch.float32)

    if isinstance(append_eos, bool) or getattr(append_eos, "ndim", None) == 0:  # one flag (numpy / torch too)
        appends = [bool(append_eos)] * len(texts)
    else:
        appends = [bool(a) for a in append_eos]
        if len(appends) != len(texts):
            raise ValueError(f"append_eos has {len(appends)} flags for {len(texts)} texts; give one per text.")

    encoded = tokenizer(texts, truncation=max_length is not None, max_length=max_length)["input_ids"]
    sequences = [list(ids) for ids in encoded]
    if any(appends):
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("append_eos=True but the tokenizer has no EOS token.")
        sequences = [ids if not add or (ids and ids[-1] == eos) else ids + [eos]
                     for ids, add in zip(sequences, appends)]
        if max_length is not None:
            sequences = [ids[: max_length - 1] + [eos] if len(ids) > max_length else ids for ids in sequences]
    empty = [i for i, ids in enumerate(sequences) if not ids]
    if empty:
        raise ValueError(f"Texts at indices {empty[:10]} tokenise to zero tokens; nothing to score.")

    pad_id = _pad_id(model, tokenizer)
    pools_by_pad_id = not isinstance(model, LlamaForScore)
    if pools_by_pad_id:
        ambiguous = [i for i, ids in enumerate(sequences) if ids[-1] == pad_id]
        if ambiguous:
            raise ValueError(
                f"Texts at indices {ambiguous[:10]} end with the pad token id {pad_id}; this sequence-"
                "classification model locates the scored token by pad id and would read the wrong position."
                " Use a tokenizer/model with a distinct pad token or do not append EOS."
            )

    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
    out = torch.empty(len(sequences), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(sequences[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(sequences[i])
                input_ids[row, :n] = torch.tensor(sequences[i], dtype=torch.long)
                attention_mask[row, :n] = 1
            batch_scores = _batch_end_scores(model, input_ids.to(device), attention_mask.to(device))
            out[torch.tensor(idx)] = batch_scores.cpu()
    finally:
        model.train(was_training)
    return out
