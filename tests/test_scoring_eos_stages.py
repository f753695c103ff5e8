"""Scores as safe-rlhf trained its models: the sampler records which responses ended at EOS, the stages pass
that to a scorer with append_eos, and scorers without it keep their old scores and cache keys."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaModel

from alignment.config import (
    Config,
    EvalConfig,
    HFModelConfig,
    LoraSpec,
    PreferenceDatasetConfig,
    SamplingConfig,
    ScorerConfig,
    ScorerSpec,
    TrackerConfig,
)
from alignment.policies import load_policy
from alignment.sampling import GenerationSpec, Samples, sample_responses
from alignment.score_models import load_score_model, score_texts
from alignment.store import ArtifactStore


def _beaver(out: Path, tiny_lm: str) -> Path:
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    cfg = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(3)
    state = {f"model.{k}": v.clone().contiguous() for k, v in LlamaModel(LlamaConfig(**cfg)).state_dict().items()}
    state["score_head.weight"] = torch.randn(1, 16)
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForScore"], "model_type": "llama", **cfg,
                                                 "score_dim": 1, "bias": False, "score_type": "reward"}))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(out)
    return out


def test_sampler_records_ended(tiny_lm):
    policy = load_policy(HFModelConfig(name_or_path=tiny_lm, lora=None, max_length=64))
    tok = policy.tokenizer
    spec = GenerationSpec(num_samples=32, max_new_tokens=40, batch_size=32)
    out = sample_responses(policy.model, tok, ["how do i bake bread ?"], spec, seed=0)
    assert isinstance(out, Samples) and np.shape(out.ended) == (1, 32)
    flags = np.array(out.ended[0])
    assert 0 < flags.sum() < 32
    lengths = np.array([len(tok(r, add_special_tokens=False)["input_ids"]) for r in out[0]])
    assert (lengths[flags] < 40).all()
    assert out == [list(r) for r in out]  # still a list of lists
    json.dumps(out)


def test_stages_score_with_eos(tmp_path, tiny_lm):
    from alignment.worlds import build_world

    rm = _beaver(tmp_path / "rm", tiny_lm)
    source = Path(__file__).parent / "data" / "pku_saferlhf_sample.jsonl"

    def make(append_eos):
        cfg = Config(
            dataset=PreferenceDatasetConfig(source=str(source), n_prompts=2, n_eval_prompts=2),
            model=HFModelConfig(name_or_path=tiny_lm, lora=LoraSpec(r=4, alpha=8), max_length=256),
            scorer=ScorerConfig(kind="text", reward=ScorerSpec(name="rm", kind="model", path=str(rm),
                                                               template="{prompt} {response}", append_eos=append_eos),
                                safety=[ScorerSpec(name="toy/safety")]),
            sampling=SamplingConfig(num_samples=16, max_new_tokens=40, batch_size=32),
            eval=EvalConfig(num_samples=2, bootstrap=20), tracker=TrackerConfig(kind="none"),
            cache_dir=str(tmp_path / "cache"), run_dir=str(tmp_path / "run"))
        return build_world(cfg, ArtifactStore(cfg.cache_dir))

    on = make(None)
    assert on._scores_need_ended
    ids, _ = on.sample_reference(torch.Generator().manual_seed(0))
    ended = np.array([[on.ended[i] for i in row] for row in ids])
    assert 0 < ended.sum() < ended.size
    reward, _ = on.score(ids)
    model, tok = load_score_model(str(rm))
    flat_p = [p for p in on.sample_prompts for _ in range(ids.shape[1])]
    texts = [f"{p} {on.texts[i]}" for p, i in zip(flat_p, ids.ravel())]
    want = score_texts(model, tok, texts, append_eos=ended.ravel().tolist(), batch_size=16).double().numpy()
    np.testing.assert_allclose(reward.ravel(), want, rtol=1e-5, atol=1e-6)

    off = make(False)
    assert not off._scores_need_ended
    ids2, _ = off.sample_reference(torch.Generator().manual_seed(0))
    assert [off.texts[i] for i in ids2.ravel()] == [on.texts[i] for i in ids.ravel()]  # same draws
    reward_off, _ = off.score(ids2)
    old = score_texts(model, tok, texts, batch_size=16).double().numpy()
    np.testing.assert_allclose(reward_off.ravel(), old, rtol=1e-5, atol=1e-6)
    assert np.abs(reward_off - reward)[ended].min() > 0 and np.abs(reward_off - reward)[~ended].max() < 1e-5

    # dataset responses are complete: scored with EOS
    pairs = on.dataset_pairs(np.zeros(1), "soft", torch.Generator().manual_seed(0))
    assert all(on.ended[int(i)] for i in pairs["y1"])


def test_stages_take_logprobs_of_the_drawn_ids(tmp_path, tiny_lm):
    """The world's π_ref log-probabilities (the dual's, stage 2's ρ) are of the token ids each sample was drawn
    as, EOS only where it ended, also after a cache round trip; a dataset's complete response is its text + EOS."""
    from alignment.policies import prompt_token_ids, token_logprob_sum
    from alignment.worlds import build_world

    source = Path(__file__).parent / "data" / "pku_saferlhf_sample.jsonl"
    cfg = Config(
        dataset=PreferenceDatasetConfig(source=str(source), n_prompts=2, n_eval_prompts=2),
        model=HFModelConfig(name_or_path=tiny_lm, lora=LoraSpec(r=4, alpha=8), max_length=256),
        scorer=ScorerConfig(kind="text", reward=ScorerSpec(name="toy/helpfulness"), safety=[ScorerSpec(name="toy/safety")]),
        sampling=SamplingConfig(num_samples=16, max_new_tokens=40, batch_size=32),
        eval=EvalConfig(num_samples=2, bootstrap=20), tracker=TrackerConfig(kind="none"),
        cache_dir=str(tmp_path / "cache"), run_dir=str(tmp_path / "run"))
    for _ in range(2):  # the second world reads the samples back from the cache
        world = build_world(cfg, ArtifactStore(cfg.cache_dir))
        ids, _ = world.sample_reference(torch.Generator().manual_seed(0))
        drawn = [world.token_ids[i] for i in ids.ravel()]
        ended = [world.ended[i] for i in ids.ravel()]
        eos = world.model.tokenizer.eos_token_id
        assert any(ended) and not all(ended)
        assert all((y[-1] == eos) == e and y.count(eos) == int(e) for y, e in zip(drawn, ended))
        assert all(len(y) == 40 for y, e in zip(drawn, ended) if not e)
        got = world.reference_logprob(ids).ravel()
    tok, model = world.model.tokenizer, world.model.handle.model
    flat_p = [p for p in world.sample_prompts for _ in range(ids.shape[1])]
    for i in (0, int(np.argmin(ended)), int(np.argmax(ended))):  # one cut and one ended sample among them
        p_ids = prompt_token_ids(tok, flat_p[i])
        row = torch.tensor([[*p_ids, *drawn[i]]])
        mask = torch.zeros_like(row, dtype=torch.bool)
        mask[0, len(p_ids):] = True
        with torch.no_grad(), world.model.acting_as(None):
            want = token_logprob_sum(model, {"input_ids": row, "attention_mask": torch.ones_like(row),
                                             "response_mask": mask})
        assert abs(got[i] - want.item()) < 1e-4  # float32 forwards over the same tokens, other layouts
    pairs = world.dataset_preferences("safe")
    assert all(world.response(int(i)) == world.texts[int(i)] for i in pairs["y1"])
