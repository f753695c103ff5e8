"""Benchmark: a margin sweep through the shared cache against the same margins as independent cold runs.

    python bench/sweep_cost.py                               # toy world, margins 0.2 0.35 0.5 (~15 min, 2 cores)
    python bench/sweep_cost.py --world tabular --margins 0.1 0.3 0.5

(a) ``python run.py sweeps=margins`` with the margins given, into an empty cache: π_ref is built, sampled and
scored once, every margin's λ* comes from those samples, each job trains once.
(b) the same margins as G separate ``python run.py safety.margin=b`` processes, each with its own empty cache
(what a user without a content cache pays).

Both are real CLI processes, measured in the same run; prints the wall time of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def peak_gb(folder: Path) -> float:
    """The largest ``memory/peak`` of the runs under ``folder`` (each run's summary.json), GB."""
    peaks = [json.loads(p.read_text()).get("memory/peak") or 0.0 for p in folder.rglob("summary.json")]
    return max(peaks, default=0.0) / 1024


def run(args: list[str], cwd: Path) -> float:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env, capture_output=True,
                         text=True)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"run.py {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="toy", choices=["toy", "tabular"])
    parser.add_argument("--margins", type=float, nargs="+", default=[0.2, 0.35, 0.5])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    grid = ",".join(f"{m:g}" for m in args.margins)
    common = [f"experiment={args.world}", "tracker=none"]
    sweep = run(["sweeps=margins", *common, f"safety.margin={grid}", "cache_dir=sweep-cache",
                 "hydra.sweep.dir=sweep"], work)
    print(f"sweep of {len(args.margins)} margins, one cache: {sweep:.0f} s, peak {peak_gb(work / 'sweep'):.2f} GB",
          flush=True)
    cold = []
    for i, margin in enumerate(args.margins):
        cold.append(run([*common, f"safety.margin={margin:g}", f"cache_dir=cold-cache-{i}", f"hydra.run.dir=cold-{i}"],
                        work))
        print(f"cold run b={margin:g}: {cold[-1]:.0f} s, peak {peak_gb(work / f'cold-{i}'):.2f} GB", flush=True)
    result = {"world": args.world, "margins": args.margins, "sweep_seconds": sweep, "cold_seconds": cold,
              "ratio_cold_over_sweep": sum(cold) / sweep, "sweep_peak_gb": peak_gb(work / "sweep"),
              "cold_peak_gb": [peak_gb(work / f"cold-{i}") for i in range(len(cold))]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"sweep_cost_{args.world}.json").write_text(json.dumps(result, indent=2))
    print(f"G = {len(args.margins)}: {len(cold)} cold runs {sum(cold):.0f} s vs one sweep {sweep:.0f} s -> "
          f"{result['ratio_cold_over_sweep']:.2f}x")


if __name__ == "__main__":
    main()
