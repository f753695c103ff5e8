"""Score-model loading and scoring on tiny random checkpoints in the exact Beaver (safe-rlhf) layout.

The checkpoints are written with safetensors directly from a stock ``LlamaModel`` state dict (prefix ``model.``)
plus a ``score_head.weight`` tensor, so the layout does not depend on the implementation under test; safe-rlhf's
current layout (``score_bias``, a ``score_head.bias`` tensor, sharded ``pytorch_model-*.bin`` with an index) is
written the same way with torch.save.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForSequenceClassification, LlamaModel, PreTrainedTokenizerFast

from alignment.score_models import (
    BEAVER_TEMPLATE,
    LlamaForScore,
    ScoreLoadingError,
    format_beaver,
    load_score_model,
    score_texts,
)

pytestmark = pytest.mark.fast  # the developers' tier (make test-fast)

HIDDEN = 32
BACKBONE = dict(
    vocab_size=300,
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)
CORPUS = [
    "BEGINNING OF CONVERSATION: USER: how do I bake bread ASSISTANT: mix flour water salt and yeast",
    "the quick brown fox jumps over the lazy dog again and again",
    "hello world how are you today I am fine thanks",
]
TEXTS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog again and again and again",
    "how are you",
    format_beaver("how do I bake bread", " mix flour water salt and yeast"),
    "fox",
]


def _write_tokenizer(directory: Path) -> None:
    """Word-level tokenizer that prepends BOS and has no pad token (as many causal-LM tokenizers)."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)


def _beaver_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    backbone = LlamaModel(LlamaConfig(**BACKBONE))
    state = {f"model.{k}": v.detach().clone().contiguous() for k, v in backbone.state_dict().items()}
    state["score_head.weight"] = torch.randn(1, HIDDEN)
    return state


def _write_beaver(directory: Path, state: dict[str, torch.Tensor], **extra_config: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForScore"],
        "model_type": "llama",
        **BACKBONE,
        "score_dim": 1,
        "bias": False,
        "score_type": "reward",
        **extra_config,
    }
    (directory / "config.json").write_text(json.dumps(config))
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def beaver_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_beaver(tmp_path_factory.mktemp("beaver"), _beaver_state_dict())


@pytest.fixture(scope="module")
def beaver(beaver_dir: Path) -> tuple[LlamaForScore, PreTrainedTokenizerFast]:
    return load_score_model(str(beaver_dir))


def test_template() -> None:
    assert format_beaver("hi", "Hello!") == "BEGINNING OF CONVERSATION: USER: hi ASSISTANT:Hello!"
    assert BEAVER_TEMPLATE.format(prompt="p", response="r") == format_beaver("p", "r")


def test_loads_beaver_layout_with_no_missing_or_unexpected_keys(beaver_dir: Path, beaver) -> None:
    model, tokenizer = beaver
    assert isinstance(model, LlamaForScore) and not model.training
    assert tokenizer.pad_token is None  # exercises the EOS-for-padding path below
    _, info = LlamaForScore.from_pretrained(str(beaver_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = load_file(str(beaver_dir / "model.safetensors"))
    loaded = model.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def test_end_scores_match_hand_computation(beaver_dir: Path, beaver) -> None:
    model, tokenizer = beaver
    state = load_file(str(beaver_dir / "model.safetensors"))
    reference = LlamaModel(LlamaConfig(**BACKBONE)).eval()
    reference.load_state_dict(
        {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    )
    head = state["score_head.weight"]  # [1, E]

    seqs = [tokenizer(t)["input_ids"] for t in TEXTS[:3]]
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), 2)  # right padding with EOS
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, ids in enumerate(seqs):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask)
        expected = torch.stack(
            [reference(input_ids=torch.tensor([ids])).last_hidden_state[0, -1] @ head[0] for ids in seqs]
        )
    assert out.scores.shape == (3, width, 1) and out.end_scores.shape == (3, 1)
    assert out.end_scores.dtype == torch.float32
    assert out.end_index.tolist() == [len(ids) - 1 for ids in seqs]
    torch.testing.assert_close(out.end_scores[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_scores_independent_of_batch_and_order_restored(beaver) -> None:
    model, tokenizer = beaver
    alone = torch.stack([score_texts(model, tokenizer, [t])[0] for t in TEXTS])
    batched = score_texts(model, tokenizer, TEXTS, batch_size=2)  # sorted by length, then restored
    assert batched.shape == (len(TEXTS),) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
    one_batch = score_texts(model, tokenizer, TEXTS, batch_size=len(TEXTS))
    torch.testing.assert_close(one_batch, alone, rtol=0, atol=1e-5)
    reversed_scores = score_texts(model, tokenizer, TEXTS[::-1], batch_size=3)
    torch.testing.assert_close(reversed_scores, alone.flip(0), rtol=0, atol=1e-5)
    assert len(set(alone.tolist())) == len(TEXTS)  # distinct, so a permutation would be caught
    assert score_texts(model, tokenizer, []).shape == (0,)


def test_max_length_truncates(beaver) -> None:
    model, tokenizer = beaver
    ids = tokenizer(TEXTS[1])["input_ids"][:4]
    prefix = tokenizer.decode(ids[1:])  # drop BOS; the tokenizer adds it again
    torch.testing.assert_close(
        score_texts(model, tokenizer, [TEXTS[1]], max_length=4), score_texts(model, tokenizer, [prefix])
    )


def test_plain_sequence_classification_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = LlamaForSequenceClassification(LlamaConfig(**BACKBONE, num_labels=1)).eval()
    reference.save_pretrained(tmp_path)
    _write_tokenizer(tmp_path)
    model, tokenizer = load_score_model(str(tmp_path))
    assert isinstance(model, LlamaForSequenceClassification)
    assert model.config.pad_token_id == tokenizer.eos_token_id  # set so batches can be pooled
    with torch.no_grad():
        expected = torch.stack([reference(**tokenizer(t, return_tensors="pt")).logits[0, 0] for t in TEXTS])
    torch.testing.assert_close(
        score_texts(model, tokenizer, TEXTS, batch_size=2), expected, rtol=0, atol=1e-5
    )


def test_sequence_classification_needs_one_label(tmp_path: Path) -> None:
    LlamaConfig(**BACKBONE, num_labels=2, architectures=["LlamaForSequenceClassification"]).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="num_labels"):
        load_score_model(str(tmp_path))


def test_missing_path_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "beaver-7b-v1.0-cost"
    with pytest.raises(FileNotFoundError, match="beaver-7b-v1.0-cost") as err:
        load_score_model(str(missing))
    assert "download" in str(err.value).lower() and "local directory" in str(err.value)


def test_missing_or_unexpected_weights_raise(tmp_path: Path) -> None:
    state = _beaver_state_dict()
    no_head = {k: v for k, v in state.items() if k != "score_head.weight"}
    with pytest.raises(ScoreLoadingError, match="missing keys: score_head.weight"):
        load_score_model(str(_write_beaver(tmp_path / "no_head", no_head)))
    extra = {**state, "value_head.weight": torch.zeros(1, HIDDEN)}
    with pytest.raises(ScoreLoadingError, match="unexpected keys: value_head.weight"):
        load_score_model(str(_write_beaver(tmp_path / "extra", extra)))


def test_optional_safe_rlhf_buffers_and_normalisation(tmp_path: Path, beaver) -> None:
    """Old safe-rlhf checkpoints also hold normaliser statistics and per-layer rotary inv_freq buffers."""
    base_model, tokenizer = beaver
    state = _beaver_state_dict()
    state["normalizer.mean"] = torch.tensor([0.5])
    state["normalizer.var"] = torch.tensor([4.0])
    state["normalizer.count"] = torch.tensor([10])
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    directory = _write_beaver(
        tmp_path / "norm",
        state,
        score_type="reward",
        do_normalize=True,
        normalizer_type="ExponentialMovingAverage",
    )
    model, _ = load_score_model(str(directory))
    assert model.normalizer.count.item() == 10
    raw = score_texts(base_model, tokenizer, TEXTS[:2])
    torch.testing.assert_close(
        score_texts(model, tokenizer, TEXTS[:2]), (raw - 0.5) / 2.0, rtol=1e-5, atol=1e-5
    )


def test_bin_weights_and_config_statistics(tmp_path: Path, beaver) -> None:
    """pytorch_model.bin loads too; without normaliser buffers, config.json's mean / var are used (cost: s / std)."""
    base_model, tokenizer = beaver
    directory = _write_beaver(
        tmp_path / "bin", {}, score_type="cost", do_normalize=True, mean=[3.0], var=[9.0]
    )
    (directory / "model.safetensors").unlink()
    torch.save(_beaver_state_dict(), directory / "pytorch_model.bin")
    model, _ = load_score_model(str(directory), dtype="bfloat16")
    assert model.score_head.weight.dtype == torch.bfloat16 and model.normalizer.var.dtype == torch.float32
    assert model.normalizer.var.item() == 9.0
    raw = score_texts(base_model, tokenizer, TEXTS[:2])
    torch.testing.assert_close(score_texts(model, tokenizer, TEXTS[:2]), raw / 3.0, rtol=0.05, atol=0.05)


# -- safe-rlhf's current layout: score_bias, a bias tensor, sharded pytorch_model*.bin ---------------------------


def _current_safe_rlhf_state(seed: int = 2) -> dict[str, torch.Tensor]:
    """Backbone under ``model.*`` and a head with a (non-zero) bias, as today's safe-rlhf saves a trained model."""
    state = _beaver_state_dict(seed)
    state["score_head.bias"] = torch.tensor([0.75])
    return state


def _write_sharded_bin(
    directory: Path, state: dict[str, torch.Tensor], config: dict[str, object], n_shards: int = 2
) -> Path:
    """Write ``state`` as ``pytorch_model-0000i-of-0000n.bin`` shards plus ``pytorch_model.bin.index.json``.

    Written with torch.save and json only (as transformers' save_pretrained names them), so the files do not come
    from the loader under test. The head lands in the last shard, the backbone is spread over all of them.
    """
    directory.mkdir(parents=True, exist_ok=True)
    keys = sorted(state, key=lambda k: k.startswith("score_head."))  # head last
    names = [f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin" for i in range(n_shards)]
    per_shard = -(-len(keys) // n_shards)
    weight_map: dict[str, str] = {}
    for index, name in enumerate(names):
        part = keys[index * per_shard : (index + 1) * per_shard]
        torch.save({k: state[k] for k in part}, directory / name)
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index_json))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", **BACKBONE, **config}))
    _write_tokenizer(directory)
    return directory


def _read_shards(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a sharded .bin checkpoint, read back through its index (not through the loader)."""
    index = json.loads((directory / "pytorch_model.bin.index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for name in sorted(set(index["weight_map"].values())):
        state.update(torch.load(directory / name, weights_only=True))
    assert set(state) == set(index["weight_map"])
    return state


def _direct_end_scores(state: dict[str, torch.Tensor], seqs: list[list[int]]) -> torch.Tensor:
    """``W h + b`` at each unpadded sequence's last token, with a stock LlamaModel as the backbone; ``[N]``."""
    reference = LlamaModel(LlamaConfig(**BACKBONE)).eval()
    reference.load_state_dict(
        {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    )
    weight = state["score_head.weight"][0]  # [E]
    bias = state.get("score_head.bias", torch.zeros(1))[0]  # safe-rlhf: no tensor = zero bias
    with torch.no_grad():
        last = [reference(input_ids=torch.tensor([ids])).last_hidden_state[0, -1] for ids in seqs]
    return torch.stack([(h * weight).sum() + bias for h in last])


def _padded(seqs: list[list[int]], side: str, pad_id: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[N, max len]`` padded on ``side`` ("right" / "left") with ``pad_id``."""
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, ids in enumerate(seqs):
        cols = slice(0, len(ids)) if side == "right" else slice(width - len(ids), width)
        input_ids[row, cols] = torch.tensor(ids)
        mask[row, cols] = 1
    return input_ids, mask


def _assert_end_scores_match(model: LlamaForScore, tokenizer, state: dict[str, torch.Tensor]) -> None:
    """The loaded model's end scores equal the direct computation to 1e-5, right- and left-padded."""
    seqs = [tokenizer(t)["input_ids"] for t in TEXTS[:4]]
    assert len(set(map(len, seqs))) == len(seqs)  # different lengths, so every row but one is padded
    expected = _direct_end_scores(state, seqs)
    for side in ("right", "left"):
        input_ids, mask = _padded(seqs, side)
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=mask)
        torch.testing.assert_close(out.end_scores[:, 0], expected, rtol=1e-5, atol=1e-5, msg=side)
    torch.testing.assert_close(
        score_texts(model, tokenizer, TEXTS[:4], batch_size=3), expected, rtol=1e-5, atol=1e-5
    )


def test_current_safe_rlhf_layout_score_bias_sharded_bin(tmp_path: Path) -> None:
    """score_bias true wins over a stale ``bias: false`` (what a config re-saved by today's safe-rlhf holds)."""
    directory = _write_sharded_bin(
        tmp_path / "beaver",
        _current_safe_rlhf_state(),
        {
            "architectures": ["LlamaForScore"],
            "score_dim": 1,
            "score_bias": True,
            "bias": False,
            "score_type": "reward",
        },
    )
    state = _read_shards(directory)
    assert state["score_head.bias"].item() == 0.75
    model, tokenizer = load_score_model(str(directory))
    assert isinstance(model, LlamaForScore) and model.score_head.bias is not None
    _assert_end_scores_match(model, tokenizer, state)


def test_score_bias_without_bias_tensor_is_a_zero_bias(tmp_path: Path) -> None:
    state = {k: v for k, v in _current_safe_rlhf_state().items() if k != "score_head.bias"}
    directory = _write_sharded_bin(
        tmp_path / "beaver",
        state,
        {"architectures": ["LlamaForScore"], "score_dim": 1, "score_bias": True, "score_type": "cost"},
    )
    model, tokenizer = load_score_model(str(directory))
    assert model.score_head.bias is not None and model.score_head.bias.tolist() == [0.0]
    _assert_end_scores_match(model, tokenizer, _read_shards(directory))


def test_first_beaver_architecture_name_and_old_bias_key(tmp_path: Path) -> None:
    """``LlamaModelForScore`` (safe-rlhf's first commits) with the old ``bias: true`` key and a bias tensor."""
    directory = _write_sharded_bin(
        tmp_path / "beaver",
        _current_safe_rlhf_state(),
        {"architectures": ["LlamaModelForScore"], "score_dim": 1, "bias": True, "score_type": "reward"},
        n_shards=1,
    )
    model, tokenizer = load_score_model(str(directory))
    assert isinstance(model, LlamaForScore)
    _assert_end_scores_match(model, tokenizer, _read_shards(directory))


def test_bias_tensor_against_a_false_bias_flag_is_rejected(tmp_path: Path) -> None:
    """Strictness stays: ``score_bias: false`` with a bias tensor means the config and weights disagree."""
    directory = _write_sharded_bin(
        tmp_path / "beaver",
        _current_safe_rlhf_state(),
        {"architectures": ["LlamaForScore"], "score_dim": 1, "score_bias": False, "bias": True},
    )
    with pytest.raises(ScoreLoadingError, match=r"unexpected keys: score_head\.bias"):
        load_score_model(str(directory))


# ----------------------------------------------------------------------------------------------------------
# Issue 16 point 2: score as safe-rlhf trained (prompt + answer + eos), EOS only on responses that ended.


def test_eos_appended_to_ended_responses_only(beaver_dir: Path, beaver) -> None:
    """Per-text ``append_eos``: an ended response is scored at an appended EOS id (the direct computation on
    ids + [eos]), a truncated one as without it; all ``False`` reproduces the old scores bit for bit."""
    model, tokenizer = beaver
    state = load_file(str(beaver_dir / "model.safetensors"))
    eos = tokenizer.eos_token_id
    texts, ended = TEXTS[:4], [True, False, True, False]
    seqs = [tokenizer(t)["input_ids"] for t in texts]
    assert all(ids[-1] != eos for ids in seqs)  # the EOS comes from the flag, not from the text
    with_eos = _direct_end_scores(state, [ids + [eos] for ids in seqs])
    old = score_texts(model, tokenizer, texts, batch_size=4)

    scores = score_texts(model, tokenizer, texts, batch_size=4, append_eos=ended)  # one padded batch
    torch.testing.assert_close(scores[[0, 2]], with_eos[[0, 2]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores[[1, 3]], old[[1, 3]], rtol=1e-5, atol=1e-5)  # truncated: no EOS
    assert (with_eos - old).abs().min() > 1e-3  # so reading the EOS position is what the ended ones do
    torch.testing.assert_close(score_texts(model, tokenizer, texts, batch_size=4, append_eos=True), with_eos,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(score_texts(model, tokenizer, texts, batch_size=4, append_eos=[False] * 4), old,
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="one per text"):
        score_texts(model, tokenizer, texts, append_eos=[True])


def test_scorer_append_eos_setting_and_cache_identity(beaver_dir: Path, beaver, tmp_path: Path) -> None:
    """ScorerSpec.append_eos: unset means on for a safe-rlhf checkpoint (which then needs ``ended``), off for
    other checkpoints, gold and learned scorers; only an 'on' scorer's cache identity changes."""
    from alignment.config import ScorerSpec
    from alignment.scorers import build_scorer, resolve_append_eos, scorer_identity

    model, tokenizer = beaver
    template = "{prompt} {response}"
    prompts, responses = ["hello", "how", "the quick"], ["world", "are you", "brown fox jumps"]
    texts = [template.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
    ended = [True, False, True]

    spec = ScorerSpec(name="rm", kind="model", path=str(beaver_dir), template=template, direction=-1)
    scorer = build_scorer(spec)
    assert spec.append_eos is None and resolve_append_eos(spec) and scorer.append_eos
    with pytest.raises(ValueError, match="ended"):
        scorer(prompts, responses)
    np.testing.assert_allclose(
        scorer(prompts, responses, ended=np.array(ended)),
        -score_texts(model, tokenizer, texts, append_eos=ended).double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(scorer(prompts, responses, ended=True),  # one flag for all (complete responses)
                               scorer(prompts, responses, ended=[True] * 3), rtol=0, atol=0)

    off = ScorerSpec(name="rm", kind="model", path=str(beaver_dir), template=template, direction=-1,
                     append_eos=False)
    old = -score_texts(model, tokenizer, texts).double().numpy()
    plain = build_scorer(off)
    assert not plain.append_eos
    np.testing.assert_array_equal(plain(prompts, responses), old)  # the old scores, exactly
    np.testing.assert_array_equal(plain(prompts, responses, ended=ended), old)  # ended ignored

    # Cache identity: the old dict unless append_eos is on.
    assert scorer_identity(spec) == {**scorer_identity(off), "append_eos": True}
    assert "append_eos" not in scorer_identity(off)
    assert scorer_identity(ScorerSpec(name="toy/safety")) == {
        "name": "toy/safety", "direction": 1, "kind": "gold", "path": None, "template": None, "dtype": "float32"}
    learned = ScorerSpec(name="minilm/safety", kind="learned")
    assert not resolve_append_eos(learned) and "append_eos" not in scorer_identity(learned)

    # Any other single-label checkpoint keeps its text as is unless told otherwise.
    LlamaConfig(**BACKBONE, num_labels=1, architectures=["LlamaForSequenceClassification"]).save_pretrained(tmp_path)
    other = ScorerSpec(name="rm", kind="model", path=str(tmp_path))
    assert not resolve_append_eos(other) and "append_eos" not in scorer_identity(other)
    assert resolve_append_eos(ScorerSpec(name="rm", kind="model", path=str(tmp_path), append_eos=True))

    for kind in ("gold", "learned"):
        with pytest.raises(ValueError, match="append_eos=true needs kind 'model'"):
            ScorerSpec(name="minilm/safety", kind=kind, append_eos=True)
    with pytest.raises(ValueError, match="append_eos is true, false or null"):
        ScorerSpec(name="rm", kind="model", path="p", append_eos="yes")
