"""Study: what closes the gap between the dual's predicted gains and the trained policy's, and at what cost.

Every variant is one MoCAN run of a world from the repo's configs (``experiment=<world>``) with stage-2 settings
overridden; they share one cache, so π_ref, its samples and scores, the dual and the reference's evaluation are
computed once and each variant pays for its own training and evaluation only. For each variant it prints:

- fit on the dual's own samples (alignment/fit.py): KL(softmax(r_λ/β) ‖ softmax(ρ)), slope and correlation of
  ρ on r_λ/β (exact fit: 0, 1, 1), and the log-mass the policy keeps on the samples (π_ref: 0);
- the safety gain predicted by the dual, measured in-sample (fresh samples on the dual's prompts) and held out,
  with 95% intervals, and the reward gain;
- the achieved KL against the predicted one;
- stage-2 compute: optimiser steps, forward + backward tokens, wall seconds and peak resident memory of training.

    python bench/stage2_study.py                                    # toy world, margin 0.5, the objectives
    python bench/stage2_study.py --vary algorithm.objective=pairwise,listwise trainer.epochs=5,10
    python bench/stage2_study.py --world tabular --vary algorithm.objective=pairwise,all_pairs,listwise

``--vary`` takes Hydra overrides with comma-separated values; the study runs their product. ``--set`` adds
overrides to every variant (e.g. ``--set trainer.batch_size=4`` for lists of 16 samples: 64 sequences per step,
as 32 pairs). Summaries go to ``--out``.

Estimation, separated from fit (``--reestimate M``): no training. The world's λ* from its own K samples per dual
prompt, then M fresh π_ref samples per dual prompt (cached like any samples), and at that λ*:

- the predicted safety and reward gains and KL of π_λ* re-estimated on the M samples, with 95% bootstrap
  intervals over prompts: what the exact π_λ* achieves, up to the M-sample estimate;
- their spread over random K-subsets of the M samples (``--subsets`` draws): what a K-sample prediction varies by;
- λ* solved on the M samples, and its prediction.

    python bench/stage2_study.py --world smollm2 --reestimate 32
    python bench/stage2_study.py --world smollm2 --reestimate 32 --set seed=1
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from alignment.experiment import run_experiment
from alignment.hydra_app import register_configs
from alignment.store import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VARY = ["algorithm.objective=pairwise,all_pairs,listwise"]


def config(world: str, overrides: list[str], run_dir: Path, cache: Path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={world}", "algorithm=mocan", "tracker=none", *overrides])
    obj = OmegaConf.to_object(cfg)
    obj.run_dir, obj.cache_dir = str(run_dir), str(cache)
    return obj


def variants(vary: list[str]) -> list[list[str]]:
    axes = [[f"{key}={value}" for value in values.split(",")] for key, values in (v.split("=", 1) for v in vary)]
    return [list(combo) for combo in itertools.product(*axes)]


def first(value):
    return value[0] if isinstance(value, list) else value


def interval(s: dict, key: str) -> str:
    if s.get(key) is None:
        return "-"
    if s.get(f"{key}_ci") is None:
        return f"{first(s[key]):+.3f}"
    value, (lo, hi) = first(s[key]), (first(v) for v in s[f"{key}_ci"])
    return f"{value:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def row(name: str, s: dict) -> str:
    safety, bounds = first(s["eval/safety_gain"]), s.get("predicted/safety_gain_ci")
    inside = "-"
    if bounds is not None:  # the held-out value inside the predicted interval; else whether the intervals overlap
        lo, hi, (e_lo, e_hi) = first(bounds[0]), first(bounds[1]), (first(v) for v in s["eval/safety_gain_ci"])
        inside = "inside" if lo <= safety <= hi else "overlap" if e_lo <= hi and lo <= e_hi else "no"
    tokens = s["compute/forward_tokens"] + s["compute/backward_tokens"]
    return (f"| {name} | {s['fit/target_kl']:.3f} | {s['fit/slope']:.2f} | {s['fit/corr']:.2f} | "
            f"{s['fit/log_mass']:+.3f} | "
            f"{interval(s, 'predicted/safety_gain')} | {interval(s, 'insample/safety_gain')} | "
            f"{interval(s, 'eval/safety_gain')} | {inside} | {first(s['predicted/reward_gain']):+.3f} / "
            f"{first(s['eval/reward_gain']):+.3f} | {s['predicted/kl']:.2f} / {s['eval/kl']:.2f} | "
            f"{s['train/steps']} | {tokens / 1e6:.2f} M | {s['time/train']:.0f} | "
            f"{s.get('memory/train', 0) / 1024:.2f} |")


HEADER = ("| variant | fit KL | fit slope | fit corr | log-mass | safety gain predicted | in-sample | held-out | vs predicted "
          "CI | reward gain predicted / held-out | KL predicted / held-out | steps | fwd+bwd tokens | "
          "train s | train peak GB |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _gain_interval(weights: np.ndarray, scores: np.ndarray, rng: np.random.Generator, draws: int = 2000
                   ) -> tuple[float, list[float]]:
    """E_x [Σ_k w_k s_k − mean_k s_k] and its 95% bootstrap interval over prompts (weights, scores: [N, K])."""
    per_prompt = (weights * scores).sum(axis=1) - scores.mean(axis=1)
    idx = rng.integers(0, len(per_prompt), size=(draws, len(per_prompt)))
    return float(per_prompt.mean()), np.percentile(per_prompt[idx].mean(axis=1), [2.5, 97.5]).tolist()


def reestimate(world: str, overrides: list[str], cache: Path, m: int, subsets: int) -> dict:
    """The estimation study (module docstring): λ* from the world's K samples, then the gains of π_λ* on M
    fresh samples per dual prompt and over K-subsets of them."""
    import torch

    from alignment.dual import dual_terms, solve_dual, tilted_weights
    from alignment.store import ArtifactStore
    from alignment.worlds import build_world

    cfg = config(world, overrides, cache / "reestimate_run", cache)
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence(cfg.seed).spawn(5)[0].generate_state(1)[0]))
    lang = build_world(cfg, ArtifactStore(cfg.cache_dir))
    ids, _ = lang.sample_reference(gen)  # the run's own K samples (the stream run_experiment draws them from)
    reward, safety = lang.score(ids)
    beta, margins = cfg.algorithm.beta, np.asarray(cfg.safety.margins)
    sol = solve_dual(reward, safety, margins, beta)
    # A sampling seed of its own (the run draws its seed from a generator; this one is fixed per cfg.seed).
    fresh = lang.generate("samples", lang.sample_prompts, m, seed=cfg.seed * 1_000_003 + 17, adapter=None)
    r_m, g_m = lang.score_texts(lang.sample_prompts, fresh)
    rng = np.random.default_rng(cfg.seed)
    w = tilted_weights(r_m, g_m, beta, sol.lam)
    safety_gain, safety_ci = _gain_interval(w, g_m[..., 0], rng)
    reward_gain, reward_ci = _gain_interval(w, r_m, rng)
    at_m = dual_terms(r_m, g_m, margins, beta, sol.lam)
    k = reward.shape[1]
    spread = []
    for _ in range(subsets):  # the same prompts, K of the M samples each
        cols = np.argsort(rng.random((len(r_m), m)), axis=1)[:, :k]
        sub_r, sub_g = np.take_along_axis(r_m, cols, 1), np.take_along_axis(g_m, cols[..., None], 1)
        spread.append(float(dual_terms(sub_r, sub_g, margins, beta, sol.lam).safety_gain[0]))
    sol_m = solve_dual(r_m, g_m, margins, beta)
    return {"world": world, "overrides": overrides, "K": k, "M": m, "prompts": len(r_m),
            "lambda_star_K": sol.lam.tolist(), "predicted_safety_gain_K": sol.predicted_safety_gain.tolist(),
            "safety_gain_M_at_lambda_K": safety_gain, "safety_gain_M_at_lambda_K_ci": safety_ci,
            "reward_gain_M_at_lambda_K": reward_gain, "reward_gain_M_at_lambda_K_ci": reward_ci,
            "kl_M_at_lambda_K": float(at_m.kl),
            "K_subsets_safety_gain_mean": float(np.mean(spread)), "K_subsets_safety_gain_sd": float(np.std(spread)),
            "lambda_star_M": sol_m.lam.tolist(), "predicted_safety_gain_M": sol_m.predicted_safety_gain.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="toy", choices=["toy", "tabular", "smollm2"])
    parser.add_argument("--margin", type=float, default=None, help="safety.margin (default: the world's)")
    parser.add_argument("--vary", nargs="+", default=DEFAULT_VARY, help="key=v1,v2,... (their product is run)")
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every variant")
    parser.add_argument("--cache", default="outputs/cache", help="shared with other runs of the same world")
    parser.add_argument("--out", default="outputs/bench/stage2_study")
    parser.add_argument("--reestimate", type=int, default=None, metavar="M",
                        help="no training: π_λ* at the world's λ* re-estimated on M fresh samples per dual prompt")
    parser.add_argument("--subsets", type=int, default=200, help="with --reestimate: K-subsets drawn")
    args = parser.parse_args()
    register_configs()
    out = Path(args.out)
    common = [*args.set, *([f"safety.margin={args.margin}"] if args.margin is not None else [])]
    if args.reestimate is not None:
        result = reestimate(args.world, common, Path(args.cache), args.reestimate, args.subsets)
        for key, value in result.items():
            print(f"{key:32s} {value}")
        atomic_write_json(out / "reestimate.json", result)
        return
    results = {}
    print(HEADER, flush=True)
    for overrides in variants(args.vary):
        name = " ".join(o.split(".")[-1] for o in overrides)
        summary = run_experiment(config(args.world, [*common, *overrides], out / name.replace(" ", "_"),
                                        Path(args.cache)), progress=False)
        results[name] = summary
        print(row(name, summary), flush=True)
    atomic_write_json(out / "summaries.json", results)


if __name__ == "__main__":
    main()
