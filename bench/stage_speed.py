"""Where the default world's minutes go, stage by stage, and what each speed-up buys, as ratios measured in one run.

Each row runs one stage of ``experiment=smollm2`` on the same prompts twice or more, the setting before and the
setting after, on the same machine in the same process (warm model, one untimed warm-up each), and prints
seconds, tokens per second and the ratio against the first setting of its group:

- sampling (π_ref's K samples per prompt, ``generate()`` with the prompt's keys and values shared): sequences
  per ``generate()`` call (``sampling.batch_size``); bf16 autocast;
- log-probabilities (π_ref's, cached once per run; the fit and held-out KL): pairs per forward
  (``policies.LOGPROB_BATCH``); bf16 autocast;
- stage 2 (one listwise step on 2 lists of K): sequences per backward (``trainer.grad_accum``); bf16 autocast.

    python bench/stage_speed.py                       # 16 prompts x 8 samples x 32 tokens
    python bench/stage_speed.py --prompts 8 --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from alignment.hydra_app import register_configs
from alignment.policies import prompt_logprob, sequence_logprob
from alignment.sampling import GenerationSpec, sample_responses
from alignment.store import ArtifactStore, atomic_write_json
from alignment.threads import set_threads
from alignment.worlds import build_world

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, repeats: int = 1) -> float:
    """Best of ``repeats`` wall seconds of ``fn()`` after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def autocast(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--cache", default="outputs/cache")
    parser.add_argument("--out", default="outputs/bench/stage_speed.json")
    args = parser.parse_args()
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=["experiment=smollm2", "tracker=none",
                                                               f"cache_dir={args.cache}"]))
    set_threads(cfg.threads, 1)
    world = build_world(cfg, ArtifactStore(cfg.cache_dir))
    handle = world.model.handle
    model, tok = handle.model, handle.tokenizer
    prompts = world.sample_prompts[:args.prompts]
    k, t = args.samples, args.max_new_tokens
    rows: list[dict] = []

    def add(group: str, setting: str, seconds: float, tokens: int) -> None:
        base = next((r["seconds"] for r in rows if r["group"] == group), seconds)
        rows.append({"group": group, "setting": setting, "seconds": seconds, "tokens_per_s": tokens / seconds,
                     "speedup": base / seconds})
        print(f"| {group} | {setting} | {seconds:.2f} | {tokens / seconds:,.0f} | {base / seconds:.2f}x |", flush=True)

    print("| stage | setting | seconds | tokens/s | vs first |\n|---|---|---|---|---|")
    drawn = {}
    with handle.reference():
        for batch, bf16 in [(32, False), (64, False), (128, False), (64, True)]:
            spec = GenerationSpec(num_samples=k, max_new_tokens=t, batch_size=batch)

            def sample(spec=spec, bf16=bf16):
                with autocast(bf16):
                    drawn["out"] = sample_responses(model, tok, prompts, spec, seed=0, progress=False)

            seconds = timed(sample)
            add("sampling", f"{batch} sequences per call{', bf16 autocast' if bf16 else ''}", seconds,
                sum(len(ids) for ids in drawn["out"].flat_ids()))
        flat_p = [p for p in prompts for _ in range(k)]
        flat_y = drawn["out"].flat_ids()
        n_tokens = sum(len(y) for y in flat_y)
        for batch, bf16 in [(32, False), (64, False), (128, False), (64, True)]:
            def logprob(batch=batch, bf16=bf16):
                with autocast(bf16):
                    sequence_logprob(model, tok, flat_p, flat_y, batch_size=batch, max_length=256)

            add("log-probabilities", f"{batch} pairs per forward{', bf16 autocast' if bf16 else ''}",
                timed(logprob), n_tokens)
    world.model.reset()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    step_p, step_y = flat_p[:2 * k], flat_y[:2 * k]  # one step: 2 lists of K
    step_tokens = sum(len(y) for y in step_y)
    for per_backward, bf16 in [(k, False), (2 * k, False), (k, True)]:
        def step(per_backward=per_backward, bf16=bf16):
            for s in range(0, len(step_p), per_backward):
                with autocast(bf16):
                    logp, _ = prompt_logprob(model, tok, step_p[s:s + per_backward], step_y[s:s + per_backward],
                                             max_length=256)
                logp.sum().backward()
            for p in params:
                p.grad = None

        add("stage-2 step", f"{per_backward} sequences per backward{', bf16 autocast' if bf16 else ''}",
            timed(step, repeats=2), step_tokens)
    model.eval()
    atomic_write_json(Path(args.out), {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
