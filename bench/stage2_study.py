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
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="toy", choices=["toy", "tabular", "smollm2"])
    parser.add_argument("--margin", type=float, default=None, help="safety.margin (default: the world's)")
    parser.add_argument("--vary", nargs="+", default=DEFAULT_VARY, help="key=v1,v2,... (their product is run)")
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every variant")
    parser.add_argument("--cache", default="outputs/cache", help="shared with other runs of the same world")
    parser.add_argument("--out", default="outputs/bench/stage2_study")
    args = parser.parse_args()
    register_configs()
    out = Path(args.out)
    common = [*args.set, *([f"safety.margin={args.margin}"] if args.margin is not None else [])]
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
