"""Benchmark: stage-2 training throughput of our loop against TRL's DPOTrainer, measured in one run.

Same model (a toy-world-sized LlamaForCausalLM, ~1 M parameters, with the toy tokenizer), same LoRA
(r = 8 on q, k, v, o), same preference pairs (toy-world demonstrations, chosen = the safer-and-helpful
response), same global batch size, same number of optimiser steps, same precision, reference log-probabilities
precomputed once in both (TRL: precompute_ref_log_probs=True) and counted in the time, gradient checkpointing
off in both. Each side runs in its own subprocess so its peak memory (max RSS) is its own.

    python bench/train_throughput.py                 # 512 pairs, batch 32, 1 epoch
    python bench/train_throughput.py --pairs 1024 --batch-size 64

Prints pairs/s, tokens/s (non-padding tokens of chosen + rejected sequences), peak RSS and the ratio.
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
    from alignment.policies import encode_pairs, load_policy, sequence_logprob, token_logprob_sum
    from alignment.training import train_pairs

    torch.set_num_threads(2)
    policy = load_policy(HFModelConfig(name_or_path=model_dir, max_length=128,
                                       lora=LoraSpec(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                    "o_proj"])))
    prompts = [p["prompt"] for p in pairs]
    texts = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    start = time.perf_counter()
    with policy.reference():
        ref = sequence_logprob(policy.model, policy.tokenizer, prompts + prompts, texts, batch_size=64,
                               max_length=128)
    n = len(pairs)

    def logratios(model, batch):
        idx = batch["prompt"]
        ps = [prompts[int(i)] for i in idx]
        enc = encode_pairs(policy.tokenizer, ps + ps, [texts[int(i)] for i in idx] + [texts[n + int(i)] for i in idx],
                           max_length=128)
        logp = token_logprob_sum(model, enc).double()
        b = len(ps)
        return logp[:b] - ref[idx], logp[b:] - ref[n + idx]

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
                         dataloader_num_workers=0, seed=0, disable_tqdm=True)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model_dir, args.pairs, args.batch_size, args.epochs)
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_model(Path(tmp))
        results = {}
        for which in ("ours", "trl"):
            proc = subprocess.run([sys.executable, __file__, "--child", which, "--model-dir", tmp, "--pairs",
                                   str(args.pairs), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs)],
                                  capture_output=True, text=True, check=False)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                raise SystemExit(f"{which} failed:\n{proc.stderr[-4000:]}")
            results[which] = json.loads(line[0][len("RESULT "):])
    print(f"pairs={args.pairs} batch={args.batch_size} epochs={args.epochs} (same model, LoRA, data, steps)")
    print(f"{'trainer':10s} {'steps':>6s} {'seconds':>8s} {'pairs/s':>8s} {'tokens/s':>9s} {'peak RSS MB':>12s}")
    for name, r in results.items():
        print(f"{name:10s} {r['steps']:6d} {r['seconds']:8.2f} {r['pairs'] / r['seconds']:8.1f} "
              f"{r['tokens'] / r['seconds']:9.0f} {r['peak_rss_mb']:12.0f}")
    ratio = results["trl"]["seconds"] / results["ours"]["seconds"]
    print(f"throughput ratio ours / TRL DPOTrainer: {ratio:.2f}x")


if __name__ == "__main__":
    main()
