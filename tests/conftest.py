"""Shared test setup: everything runs offline and quietly, with W&B in offline mode."""

from __future__ import annotations

import os

import pytest
import torch

# Without these a hub lookup retries for ~23 s before failing; tests never touch the network.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A randomly initialised 2-layer Llama with the toy world's word-level tokenizer, saved like any model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignment.worlds.toy import build_tokenizer

    out = tmp_path_factory.mktemp("tiny_lm")
    tok = build_tokenizer(out_dir=out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    return str(out)
