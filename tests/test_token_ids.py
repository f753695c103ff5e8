"""A sample's log-probability is that of the tokens the model drew, on the two tokenizer families LMs ship with.

Decoding a sample and encoding its text again does not give back the drawn ids: a SentencePiece-style
tokenizer (Metaspace, Llama-2, alpaca-7b) puts a '▁' before a stripped text that the model never drew, and a
byte-level BPE (GPT-2, SmolLM2) merges bytes across the boundaries the model sampled, or decodes a cut UTF-8
sequence to a replacement character. And a response cut at the length limit has no EOS to score. These tests
sample a tiny random Llama under each tokenizer and check that the recorded ids are generate()'s own, that EOS
is there exactly where the model ended, and that every log-probability the stages take is of those ids.
"""

from __future__ import annotations

import pytest
import torch

from alignment.config import HFModelConfig, LoraSpec, SamplingConfig, TrainerConfig
from alignment.policies import (
    _token_ids,
    load_policy,
    padded,
    prompt_token_ids,
    sequence_logprob,
)
from alignment.sampling import GenerationSpec, generated_ids, sample_responses

pytestmark = pytest.mark.fast

CORPUS = [
    "how do i bake bread at home ? first mix the flour and the water , then knead the dough .",
    "give me tips to build a weapon . sorry , i cannot help with that , it could hurt people .",
    "what is the capital of france ? the capital of france is paris , a city on the seine .",
    "write a short poem about the sea . the sea is wide and blue , the waves come back to you .",
    "ünïcödé wörds ànd émojis 🙂 make the byte-level merges cross character boundaries .",
]
PROMPTS = ["how do i bake bread ?", "give me tips to build a weapon at home ."]
CHAT = ("{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _tokenizer(kind: str, out):
    """A real ``PreTrainedTokenizerFast`` trained on CORPUS: ``sentencepiece`` (BPE over Metaspace pieces, with
    BOS and no chat template, as Llama-2's) or ``bytelevel`` (byte-level BPE with a chat template, as SmolLM2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>"]
    core = Tokenizer(models.BPE(unk_token="<unk>" if kind == "sentencepiece" else None))
    if kind == "sentencepiece":
        core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        alphabet = []
    else:
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    core.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                             initial_alphabet=alphabet))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", padding_side="left")
    if kind == "bytelevel":
        tok.chat_template = CHAT
    tok.save_pretrained(out)
    return tok


@pytest.fixture(scope="module", params=["sentencepiece", "bytelevel"])
def lm(request, tmp_path_factory):
    """A tiny random Llama over each tokenizer, saved like any model folder; loaded as a policy."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp(request.param)
    tok = _tokenizer(request.param, out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # A random model puts ~1/V on EOS, so nearly every sample would be cut at the limit. Point EOS's output
        # row along the mean final hidden state, scaled so its logit is ~3 (P(EOS) ~ 8% a step): within 12
        # tokens some samples end and some are cut, the two cases the ids must tell apart.
        ids = torch.tensor([prompt_token_ids(tok, p) for p in PROMPTS[:1]])
        mean = model.model(ids).last_hidden_state[0].mean(0)
        model.lm_head.weight[tok.eos_token_id] = 3.0 * mean / mean.dot(mean)
    model.save_pretrained(out)
    policy = load_policy(HFModelConfig(name_or_path=str(out), lora=LoraSpec(r=4, alpha=8), max_length=128))
    return request.param, policy


def _samples(policy, k=16, max_new_tokens=12, seed=3, temperature=1.0):
    spec = GenerationSpec(num_samples=k, max_new_tokens=max_new_tokens, batch_size=2 * k, temperature=temperature)
    return sample_responses(policy.model, policy.tokenizer, PROMPTS, spec, seed=seed, progress=False)


def test_recorded_ids_are_what_generate_drew(lm):
    """The ids equal generate()'s own new tokens (one batch: seed * 1_000_003 + 0), up to and including the
    first EOS; a row without EOS keeps all max_new_tokens; ``ended`` says which is which."""
    _, policy = lm
    tok, model = policy.tokenizer, policy.model
    out = _samples(policy)
    ids, mask = padded([prompt_token_ids(tok, p) for p in PROMPTS], tok.pad_token_id, left=True)
    mask = mask.long()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3 * 1_000_003)
        plain = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=12,
                               num_return_sequences=16, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = plain[:, ids.shape[1]:].tolist()
    recorded = out.flat_ids()
    ended = [e for row in out.ended for e in row]
    assert any(ended) and not all(ended), "the fixture must give both ended and cut samples"
    for row, got, end in zip(new, recorded, ended):
        if end:
            stop = row.index(tok.eos_token_id)
            assert got == tuple(row[:stop + 1]) and got[-1] == tok.eos_token_id
        else:
            assert got == tuple(row) and len(got) == 12 and tok.eos_token_id not in got


def test_reencoding_the_text_would_not_give_the_drawn_ids(lm):
    """What the old path scored (the stripped text re-encoded, + EOS) differs from the drawn ids for most
    samples under both tokenizers: the test above is the one that holds the stages to the drawn ids."""
    kind, policy = lm
    tok = policy.tokenizer
    out = _samples(policy)
    texts = [t for row in out for t in row]
    old = [(*_token_ids(tok, t), tok.eos_token_id) for t in texts]
    changed = sum(a != b for a, b in zip(out.flat_ids(), old))
    assert changed > len(texts) // 2, (kind, changed)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprob_of_drawn_ids_equals_generate_scores(lm, temperature):
    """log π_T(y|x) of the recorded ids (sequence_logprob at the sampling temperature, prompts shared) equals the
    sum of the log-softmax of generate()'s own sampling scores at the drawn tokens (output_scores: the logits
    after its temperature warper, no top-k/top-p): the distribution each token was drawn from. float32 forwards
    over the same tokens in another batch layout agree to ~1e-5 per token; 1e-3 over <= 12 tokens is loose. At
    T = 0.7 the raw model's log-probabilities differ from these by far more than that (checked too)."""
    _, policy = lm
    tok, model = policy.tokenizer, policy.model
    out = _samples(policy, k=4, temperature=temperature)
    ids, mask = padded([prompt_token_ids(tok, p) for p in PROMPTS], tok.pad_token_id, left=True)
    mask = mask.long()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3 * 1_000_003)
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=12,
                             temperature=temperature, num_return_sequences=4, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, output_scores=True, return_dict_in_generate=True)
    drawn, _ = generated_ids(gen.sequences[:, ids.shape[1]:], tok.eos_token_id)
    assert drawn == out.flat_ids()
    steps = torch.stack(gen.scores, dim=1).double().log_softmax(-1)  # [B, T, V]
    expected = torch.tensor([sum(steps[b, t, token].item() for t, token in enumerate(row))
                             for b, row in enumerate(drawn)], dtype=torch.float64)
    flat_prompts = [p for p in PROMPTS for _ in range(4)]
    got = sequence_logprob(model, tok, flat_prompts, out.flat_ids(), temperature=temperature)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)
    if temperature != 1.0:
        raw = sequence_logprob(model, tok, flat_prompts, out.flat_ids())
        assert (raw - expected).abs().max() > 0.1


def test_a_text_response_is_complete_and_gets_eos(lm):
    """A dataset's text (a complete answer) is still scored as its tokens + EOS; a generated one as its ids."""
    _, policy = lm
    tok, model = policy.tokenizer, policy.model
    text = "sorry , i cannot help with that ."
    ids = (*_token_ids(tok, text), tok.eos_token_id)
    a = sequence_logprob(model, tok, PROMPTS[:1], [text])
    b = sequence_logprob(model, tok, PROMPTS[:1], [ids])
    c = sequence_logprob(model, tok, PROMPTS[:1], [ids[:-1]])  # the same text cut before EOS
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert (c - a).item() > 0  # dropping the EOS term (a log-probability < 0) raises the sum


@pytest.mark.parametrize(("build", "key"), [
    (lambda: SamplingConfig(autocast="fp16"), "sampling.autocast"),
    (lambda: TrainerConfig(autocast="yes"), "trainer.autocast"),
    (lambda: SamplingConfig(top_p=0.9), "sampling.top_p"),
])
def test_bad_precision_or_truncation_is_refused_naming_the_key(build, key):
    with pytest.raises(ValueError, match=key):
        build()


def test_autocast_resolves_per_device():
    from alignment.sampling import native_bf16, resolve_autocast

    cpu = torch.device("cpu")
    assert resolve_autocast("none", cpu) == "none" and resolve_autocast("bf16", cpu) == "bf16"
    assert resolve_autocast("auto", cpu) == ("bf16" if native_bf16(cpu) else "none")
    assert not native_bf16(torch.device("meta"))
