"""How far a world's samples change when their decoded text is re-encoded, and what that did to log π_ref.

Until 2026-12 every log-probability of a sample (π_ref's, the policy's, stage 2's ρ, the held-out KL) was taken
of its decoded, stripped text tokenised again, with EOS appended even to responses cut at the length limit. Now
they are taken of the token ids the model drew (``Samples.token_ids``). This measures the difference on a
world's own π_ref samples (the dual's prompts, the configured K; cached like a run's):

- the share of samples whose re-encoded ids differ from the drawn ones, and the share cut at the length limit
  (which got an EOS appended that the model never produced);
- log π_ref of the drawn ids against log π_ref of the re-encoded text + EOS: mean and largest |difference|, and
  the within-prompt spread of the difference (the part the listwise objective sees: a constant per prompt
  cancels in softmax(ρ), a varying one is noise in the target's log-ratios).

    python bench/token_roundtrip.py                    # the default world (SmolLM2, byte-level BPE)
    python bench/token_roundtrip.py --world toy        # the toy world (word-level tokenizer)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from alignment.hydra_app import register_configs
from alignment.policies import response_token_ids, sequence_logprob
from alignment.store import ArtifactStore, atomic_write_json
from alignment.worlds import build_world

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="smollm2", choices=["smollm2", "toy"])
    parser.add_argument("--set", nargs="*", default=[], help="Hydra overrides, e.g. seed=1 sampling.num_samples=16")
    parser.add_argument("--cache", default="outputs/cache")
    parser.add_argument("--out", default="outputs/bench/token_roundtrip.json")
    args = parser.parse_args()
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=[f"experiment={args.world}", "tracker=none",
                                                               f"cache_dir={args.cache}", *args.set]))
    torch.manual_seed(cfg.seed)
    world = build_world(cfg, ArtifactStore(cfg.cache_dir))
    ids, _ = world.sample_reference(torch.Generator().manual_seed(cfg.seed))
    tok, handle = world.model.tokenizer, world.model.handle
    flat = ids.ravel()
    prompts = [world.sample_prompts[i] for i in range(ids.shape[0]) for _ in range(ids.shape[1])]
    drawn = [world.token_ids[i] for i in flat]
    texts = [world.texts[i] for i in flat]
    reencoded = [tuple(response_token_ids(tok, t)) for t in texts]  # what the old path scored: text + EOS
    changed = np.array([a != b for a, b in zip(drawn, reencoded)])
    eos = tok.eos_token_id
    changed_text = np.array([tuple(t for t in a if t != eos) != tuple(t for t in b if t != eos)
                             for a, b in zip(drawn, reencoded)])  # other than by the EOS
    cut = np.array([not world.ended[i] for i in flat])
    with handle.reference():
        lp_drawn = sequence_logprob(handle.model, tok, prompts, drawn, max_length=world.model_cfg.max_length)
        lp_text = sequence_logprob(handle.model, tok, prompts, texts, max_length=world.model_cfg.max_length)
    diff = (lp_text - lp_drawn).numpy().reshape(ids.shape)
    report = {
        "world": args.world, "samples": int(flat.size), "prompts": int(ids.shape[0]),
        "tokenizer": type(tok).__name__,
        "ids_changed_share": float(changed.mean()),
        "ids_changed_besides_eos_share": float(changed_text.mean()),
        "ids_changed_share_ended": float(changed[~cut].mean()) if (~cut).any() else None,
        "cut_at_length_share": float(cut.mean()),
        "mean_abs_logprob_shift": float(np.abs(diff).mean()),
        "max_abs_logprob_shift": float(np.abs(diff).max()),
        "mean_logprob_shift_cut": float(diff.ravel()[cut].mean()) if cut.any() else None,
        "mean_logprob_shift_ended": float(diff.ravel()[~cut].mean()) if (~cut).any() else None,
        "within_prompt_sd_of_shift": float(diff.std(axis=1).mean()),
    }
    for key, value in report.items():
        print(f"{key:28s} {value:.4f}" if isinstance(value, float) else f"{key:28s} {value}")
    atomic_write_json(Path(args.out), report)


if __name__ == "__main__":
    main()
