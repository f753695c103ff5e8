"""Benchmark: what each algorithm spends to reach the same margin, measured in one run on one world.

One-shot dualization (MoCAN, PeCAN), MoCAN with one Newton correction of λ, against primal-dual with retraining (cold start, and warm from λ*) and
Safe-RLHF-style online primal-dual, all from the repo's configs (``experiment=<world> algorithm=<name>``) with
the same stages, scorers and evaluation. The artifacts every algorithm shares (π_ref, its samples and scores,
the reference's evaluation samples) are built once first; each algorithm then starts from a copy of that cache,
so its wall time counts only its own work.

    python bench/algorithms.py                        # toy world, margin 0.5 (about 30 minutes on 2 CPU cores)
    python bench/algorithms.py --world tabular        # seconds
    python bench/algorithms.py --only mocan safe_rlhf --set algorithm.safe_rlhf.steps=50

Prints a Markdown table (compute counts as defined in alignment/compute.py, wall seconds of the algorithm's
own stages, the achieved safety and reward gains on held-out prompts with 95% intervals) and the ratio of each
algorithm's compute to MoCAN's, and writes every summary to ``--out``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from alignment.experiment import run_experiment
from alignment.hydra_app import register_configs
from alignment.store import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "mocan": ["algorithm=mocan"],
    "mocan_newton": ["algorithm=mocan_newton"],
    "pecan": ["algorithm=pecan"],
    "primal_dual_cold": ["algorithm=primal_dual"],
    "primal_dual_warm": ["algorithm=primal_dual", "algorithm.primal_dual.warm_start=true"],
    "safe_rlhf": ["algorithm=safe_rlhf"],
}


def config(world: str, overrides: list[str], run_dir: Path, cache: Path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={world}", "tracker=none", *overrides])
    obj = OmegaConf.to_object(cfg)
    obj.run_dir, obj.cache_dir = str(run_dir), str(cache)
    return obj


def interval(summary: dict, key: str) -> str:
    value, (low, high) = summary[key], summary[f"{key}_ci"]
    value, low, high = (v[0] if isinstance(v, list) else v for v in (value, low, high))
    return f"{value:+.3f} [{low:+.3f}, {high:+.3f}]"


def table(results: dict[str, dict]) -> str:
    peer = results.get("mocan")
    lines = ["| algorithm | training runs | generated tokens | forward tokens | backward tokens | scorer calls | "
             "wall s | peak GB | x MoCAN (fwd+bwd tokens) | λ | constraint met | safety gain [95% CI] | "
             "reward gain [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in results.items():
        tokens = s["compute/forward_tokens"] + s["compute/backward_tokens"]
        ratio = (f"{tokens / (peer['compute/forward_tokens'] + peer['compute/backward_tokens']):.2f}"
                 if peer else "-")
        lam = ", ".join(f"{v:.3f}" for v in s["dual/lambda"]) if s["dual/lambda"] is not None else "-"
        wall = s["compute/wall_seconds"] - s["time/setup"]
        # The run's peak resident memory (alignment/compute.py: each stage's high-water mark is its own).
        peak = f"{s['memory/peak'] / 1024:.2f}" if s.get("memory/peak") else "-"
        lines.append(f"| {name} | {s['compute/training_runs']} | {s['compute/generated_tokens']:,} | "
                     f"{s['compute/forward_tokens']:,} | {s['compute/backward_tokens']:,} | "
                     f"{s['compute/scorer_calls']:,} | {wall:.0f} | {peak} | {ratio} | {lam} | "
                     f"{s['eval/constraint_met']} | {interval(s, 'eval/safety_gain')} | "
                     f"{interval(s, 'eval/reward_gain')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="toy", choices=["toy", "tabular"])
    parser.add_argument("--margin", type=float, default=0.5)
    parser.add_argument("--only", nargs="*", choices=sorted(VARIANTS), help="a subset of the algorithms")
    parser.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides for every algorithm")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    args = parser.parse_args()
    register_configs()
    work = Path(tempfile.mkdtemp(prefix="bench-algorithms-"))
    shared = work / "shared-cache"
    common = [f"safety.margin={args.margin}", *args.set]
    # π_ref, its samples and scores, and the reference's evaluation samples: built once, shared by all.
    run_experiment(config(args.world, ["algorithm=reference", *common], work / "reference", shared), progress=False)
    results: dict[str, dict] = {}
    for name in args.only or VARIANTS:
        cache = work / f"cache-{name}"
        if shared.exists():  # the tabular world caches nothing
            shutil.copytree(shared, cache)
        summary = run_experiment(config(args.world, [*VARIANTS[name], *common], work / name, cache), progress=False)
        results[name] = summary
        print(f"{name}: done in {summary['compute/wall_seconds']:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"algorithms_{args.world}.json"
    atomic_write_json(out, {name: {k: v for k, v in s.items() if k != "packages"} for name, s in results.items()})
    print(table(results))
    for name in ("primal_dual_cold", "primal_dual_warm"):
        if name in results:
            history = results[name]["primal_dual/history"]
            print(f"{name}: " + " -> ".join(f"λ={h['lambda'][0]:.3f} (slack {h['slack'][0]:+.3f})" for h in history))
    if "safe_rlhf" in results:
        s = results["safe_rlhf"]
        print(f"safe_rlhf: first batch meeting the margin at step {s['safe_rlhf/first_feasible_step']} of "
              f"{len(s['safe_rlhf/history'])}")
    print(f"summaries: {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
