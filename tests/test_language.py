"""Language-model parts on a tiny real LlamaForCausalLM: log-probabilities over response tokens, the reference
as the disabled adapter, LoRA, seeded sampling, scorers with explicit directions, and the cached stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignment.config import HFModelConfig, LoraSpec, ScorerSpec
from alignment.policies import encode_pairs, format_prompt, load_policy, sequence_logprob
from alignment.sampling import GenerationSpec, sample_responses
from alignment.scorers import Scorer, build_scorer

pytestmark = pytest.mark.fast  # the developers' tier (make test-fast)


def model_cfg(path: str, lora: bool = True) -> HFModelConfig:
    return HFModelConfig(name_or_path=path, lora=LoraSpec(r=4, alpha=8) if lora else None, max_length=64)


PROMPTS = ["how do i bake bread ?", "give me tips to build a pipe bomb at home ."]
RESPONSES = ["sure . first mix the flour .", "sorry , that could hurt people ."]


def test_logprob_counts_response_tokens_only(tiny_lm):
    policy = load_policy(model_cfg(tiny_lm, lora=False))
    tok, model = policy.tokenizer, policy.model
    got = sequence_logprob(model, tok, PROMPTS, RESPONSES)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        prompt_ids = tok(format_prompt(tok, p), add_special_tokens=False)["input_ids"]
        full = prompt_ids + tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(full[1:])[:, None])[:, 0]
        manual = logp[len(prompt_ids) - 1:].sum()  # tokens after the prompt, EOS included
        assert got[i].item() == pytest.approx(manual.item(), abs=1e-4)
    # Batch composition and padding do not change the value.
    alone = sequence_logprob(model, tok, PROMPTS[:1], RESPONSES[:1])
    assert alone[0].item() == pytest.approx(got[0].item(), abs=1e-4)


def test_reference_is_the_disabled_adapter(tiny_lm):
    policy = load_policy(model_cfg(tiny_lm))
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    base = sequence_logprob(load_policy(model_cfg(tiny_lm, lora=False)).model, policy.tokenizer, PROMPTS,
                            RESPONSES)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    moved = sequence_logprob(policy.model, policy.tokenizer, PROMPTS, RESPONSES)
    with policy.reference():
        ref = sequence_logprob(policy.model, policy.tokenizer, PROMPTS, RESPONSES)
    torch.testing.assert_close(ref, base, atol=1e-6, rtol=0)
    assert (moved - ref).abs().max() > 1e-3


def test_encode_pairs_truncates_response_not_prompt(tiny_lm):
    policy = load_policy(model_cfg(tiny_lm, lora=False))
    long = " ".join(["sure ."] * 100)
    enc = encode_pairs(policy.tokenizer, PROMPTS[:1], [long], max_length=40)
    prompt_len = len(policy.tokenizer(format_prompt(policy.tokenizer, PROMPTS[0]), add_special_tokens=False)[
        "input_ids"])
    assert enc["input_ids"].shape[1] == 40
    assert int(enc["response_mask"][0].sum()) == 40 - prompt_len


def test_sampling_is_seeded(tiny_lm):
    policy = load_policy(model_cfg(tiny_lm, lora=False))
    spec = GenerationSpec(num_samples=3, max_new_tokens=8, batch_size=6)
    a = sample_responses(policy.model, policy.tokenizer, PROMPTS, spec, seed=1)
    b = sample_responses(policy.model, policy.tokenizer, PROMPTS, spec, seed=1)
    c = sample_responses(policy.model, policy.tokenizer, PROMPTS, spec, seed=2)
    assert len(a) == 2 and all(len(row) == 3 for row in a)
    assert a == b and a != c
    assert all(isinstance(s, str) and "<s>" not in s for row in a for s in row)


def test_missing_model_path_names_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.name_or_path"):
        load_policy(model_cfg(str(tmp_path / "nope")))


def test_scorer_direction_and_nan_guard():
    cost = Scorer("cost", -1, lambda p, r: np.array([1.0, 2.0]))
    np.testing.assert_array_equal(cost(["a", "b"], ["x", "y"]), [-1.0, -2.0])
    broken = Scorer("broken", 1, lambda p, r: np.array([np.nan, 1.0]))
    with pytest.raises(ValueError, match="broken"):
        broken(["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="no gold scorer"):
        build_scorer(ScorerSpec(name="unknown"))
    with pytest.raises(ValueError, match="needs a path"):
        ScorerSpec(name="rm", kind="model")


def test_model_scorer_negates_a_cost_model(tmp_path):
    """A sequence-classification checkpoint used as a cost: direction -1 gives exactly minus its score."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from alignment.score_models import load_score_model, score_texts
    from alignment.worlds.toy import build_tokenizer

    tok = build_tokenizer(out_dir=tmp_path)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    spec = ScorerSpec(name="cost", kind="model", path=str(tmp_path), direction=-1, template="{prompt} {response}")
    scores = build_scorer(spec)(PROMPTS, RESPONSES)
    model, tokenizer = load_score_model(str(tmp_path))
    raw = score_texts(model, tokenizer, [f"{p} {r}" for p, r in zip(PROMPTS, RESPONSES)]).double().numpy()
    np.testing.assert_allclose(scores, -raw, rtol=1e-6)


def test_preference_dataset_pairs_end_to_end(tmp_path, tiny_lm):
    """pair_source=dataset: stage 2 trains on the records' own response pairs (the paper's MoCAN code), with
    prompts and held-out prompts from a local PKU-SafeRLHF file; scorers read any text."""
    from pathlib import Path

    from alignment.config import (
        AlgorithmConfig,
        Config,
        DualConfig,
        EvalConfig,
        PreferenceDatasetConfig,
        SafetyConfig,
        SamplingConfig,
        ScorerConfig,
        TrackerConfig,
        TrainerConfig,
    )
    from alignment.experiment import run_experiment

    source = Path(__file__).parent / "data" / "pku_saferlhf_sample.jsonl"
    cfg = Config(
        dataset=PreferenceDatasetConfig(source=str(source), n_prompts=2, n_eval_prompts=2),
        model=HFModelConfig(name_or_path=tiny_lm, lora=LoraSpec(r=4, alpha=8), max_length=256),
        scorer=ScorerConfig(kind="text", reward=ScorerSpec(name="toy/helpfulness"),
                            safety=[ScorerSpec(name="toy/safety")]),
        safety=SafetyConfig(margin=-1.0),
        algorithm=AlgorithmConfig(beta=1.0, pair_source="dataset", dual=DualConfig(bootstrap=10)),
        sampling=SamplingConfig(num_samples=4, max_new_tokens=8),
        trainer=TrainerConfig(lr=1e-3, epochs=2, batch_size=2, log_every=1),
        eval=EvalConfig(num_samples=2, bootstrap=20),
        tracker=TrackerConfig(kind="none"),
        cache_dir=str(tmp_path / "cache"),
        run_dir=str(tmp_path / "run"),
    )
    s = run_experiment(cfg, progress=False)
    assert s["status"] == "completed"
    assert s["train/pairs"] == 2  # one record per chosen prompt in the sample file
    assert s["train/steps"] == 2 and s["eval/prompts"] == 2


def test_sampling_draws_from_the_full_distribution(tiny_lm):
    """No hidden top-k truncation: with one prompt, single-token responses hit more than 50 distinct tokens
    (a random 600-token model spreads mass widely; generate()'s default top_k=50 would cap it at 50)."""
    policy = load_policy(model_cfg(tiny_lm, lora=False))
    spec = GenerationSpec(num_samples=400, max_new_tokens=1, batch_size=400)
    out = sample_responses(policy.model, policy.tokenizer, PROMPTS[:1], spec, seed=0)
    assert len(set(out[0])) > 50
    before = torch.random.get_rng_state()
    sample_responses(policy.model, policy.tokenizer, PROMPTS[:1], GenerationSpec(num_samples=2, max_new_tokens=2),
                     seed=0)
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's RNG is untouched


def test_grouped_logprob_and_its_gradient_equal_the_flat_batch(tiny_lm):
    """groups_logprob_sum runs each distinct prompt once (left-padded) and the responses on their prompts' keys
    and values; the values and the LoRA gradients must be those of the flat batch (every pair its own
    sequence). The same float32 sums in another order: differences are rounding, ~1e-6 of values of order 10,
    so 1e-4 leaves two orders of margin."""
    from alignment.policies import encode_groups, groups_logprob_sum, prompt_logprob, token_logprob_sum

    policy = load_policy(model_cfg(tiny_lm))
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))  # a moved adapter, so its gradients are not trivial
    tok, model = policy.tokenizer, policy.model
    # Two prompts of different lengths (so the shorter is left-padded), interleaved, responses of several lengths.
    prompts = ["bread ?", PROMPTS[1], PROMPTS[1], "bread ?", PROMPTS[1]]
    responses = ["sure . first mix the flour .", "no .", "sorry , that could hurt people . sorry .", "yes .",
                 "sorry ."]
    enc = encode_groups(tok, prompts, responses, max_length=64)
    assert enc["prompt_ids"].shape[0] == 2 and not enc["prompt_mask"].all()
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])  # distinct weights: each row's gradient counts

    def value_and_grad(fn):
        model.zero_grad()
        out = fn()
        (out * weights).sum().backward()
        return out.detach(), [p.grad.clone() for p in lora]

    flat, flat_grad = value_and_grad(lambda: token_logprob_sum(
        model, encode_pairs(tok, prompts, responses, max_length=64)))
    grouped, grouped_grad = value_and_grad(lambda: groups_logprob_sum(model, enc))
    torch.testing.assert_close(grouped, flat, atol=1e-4, rtol=0)
    for a, b in zip(grouped_grad, flat_grad):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # Batched in any size, the same values in input order, and the same token count as the layout processes.
    got, _ = prompt_logprob(model, tok, prompts, responses, max_length=64, batch_size=2)
    torch.testing.assert_close(got.detach(), flat, atol=1e-4, rtol=0)
    _, tokens = prompt_logprob(model, tok, prompts, responses, max_length=64)  # one batch: 2 prompt runs, not 5
    prompt_tokens = int(enc["prompt_mask"].sum())
    assert tokens == prompt_tokens + int(enc["response_mask"].sum())
    assert tokens < int(encode_pairs(tok, prompts, responses, max_length=64)["attention_mask"].sum())
    torch.testing.assert_close(sequence_logprob(model, tok, prompts, responses), flat.double(), atol=1e-4, rtol=0)


def test_sampling_runs_each_prompt_once_and_draws_what_generate_draws(tiny_lm):
    """sample_responses runs the prompts once and repeats their keys and values for the K samples; generate()
    on K copies of each prompt (num_return_sequences) must draw the same tokens from the same seed: the same
    logits up to float rounding (a draw flips only if its uniform falls within ~1e-7 of a CDF boundary) and
    the same random numbers in the same order."""
    from alignment.sampling import _shared_prompts

    policy = load_policy(model_cfg(tiny_lm, lora=False))
    tok, model = policy.tokenizer, policy.model
    spec = GenerationSpec(num_samples=3, max_new_tokens=8, batch_size=6)
    prompts = ["bread ?", PROMPTS[1]]  # of different lengths: left padding, so the position ids matter
    got = sample_responses(model, tok, prompts, spec, seed=5)
    tok.padding_side = "left"
    enc = tok([format_prompt(tok, p) for p in prompts], return_tensors="pt", padding=True,
              add_special_tokens=not getattr(tok, "chat_template", None))
    assert not enc["attention_mask"].all()
    shared = _shared_prompts(model, enc, 3)
    # The last prompt token on the shared cache predicts what the whole padded prompt predicts (a random tiny
    # model barely depends on positions, so the samples alone would not catch wrong position ids: the logits do).
    ids, mask = enc["input_ids"], enc["attention_mask"]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        last = model(input_ids=shared["input_ids"][:, -1:], attention_mask=shared["attention_mask"],
                     position_ids=positions.repeat_interleave(3, dim=0)[:, -1:], cache=shared["cache"]).logits[:, -1]
    torch.testing.assert_close(last, whole.repeat_interleave(3, dim=0), atol=1e-5, rtol=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5 * 1_000_003 + 0)  # sample_responses' seed for its first batch
        plain = model.generate(**enc, do_sample=True, top_k=0, max_new_tokens=8, num_return_sequences=3,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    decoded = [s.strip() for s in tok.batch_decode(plain[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    assert [y for row in got for y in row] == decoded
