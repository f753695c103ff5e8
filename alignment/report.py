"""Aggregate a sweep: every job's summary into ``results.csv``, helpfulness-safety Pareto fronts per algorithm
with bootstrap intervals over seeds and prompts, charts, and a sweep-level W&B run in the jobs' group.

    python -m alignment.report outputs/multirun/2026-11-28/18-00-00      # on demand
    (runs by itself after every multirun: conf/config.yaml's SweepReport callback, alignment/hydra_app.py)

Reads local outputs only (``summary.json`` and ``arrays.npz`` per job); writes into ``<sweep>/report/``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alignment.store import atomic_write_json, atomic_write_text
from alignment.sweep import Point, Sweep, load_sweep, sweep_group, sweep_points

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Tables


def _scalar_columns(summary: dict[str, Any]) -> dict[str, Any]:
    """A flat row: scalars as they are, vectors as <key>_<j>, intervals as <key>_low_<j> / <key>_high_<j>."""
    row: dict[str, Any] = {}
    for key, value in summary.items():
        if key in ("packages", "cache/events") or key.endswith("/history"):
            continue
        if key.endswith("_ci") and isinstance(value, list) and len(value) == 2:
            for bound, values in zip(("low", "high"), value):
                for j, v in enumerate(np.atleast_1d(values)):
                    row[f"{key[:-3]}_{bound}_{j}"] = float(v)
        elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            for j, v in enumerate(value):
                row[f"{key}_{j}"] = v
        elif value is None or isinstance(value, (str, int, float, bool)):
            row[key] = value
    return row


def results_table(sweep: Sweep) -> tuple[list[str], list[list[Any]]]:
    rows = [{"run_dir": str(job.run_dir), **_scalar_columns(job.summary)} for job in sweep.jobs]
    first = ["run_dir", "algorithm/label", "algorithm", "seed", "margin_0", "dual/lambda_0",
             "predicted/safety_gain_0", "eval/safety_gain_0", "eval/safety_gain_low_0", "eval/safety_gain_high_0",
             "eval/reward_gain", "eval/reward_gain_low_0", "eval/reward_gain_high_0", "eval/constraint_met"]
    seen = [c for c in first if any(c in r for r in rows)]
    rest = sorted({c for r in rows for c in r} - set(seen))
    columns = seen + rest
    return columns, [[r.get(c) for c in columns] for r in rows]


def write_csv(path: Path, columns: list[str], rows: list[list[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------------------------
# The report


@dataclass
class SweepReportResult:
    results_csv: Path
    jobs: int
    reused: int
    failed: list[str]
    points: list[Point]


def report_sweep(root: str | Path, *, tracker_kind: str = "none", project: str = "constrained-alignment",
                 entity: str | None = None, group: str | None = None, mode: str | None = None,
                 figures: bool = True) -> SweepReportResult:
    """Write ``report/results.csv``, ``report/points.json`` and the sweep charts; log them to a sweep-level
    tracker run (W&B job_type ``sweep-report`` in the jobs' group) when ``tracker_kind`` is ``wandb``."""
    from alignment.console import quiet_libraries
    from alignment.tracking import make_tracker

    quiet_libraries()  # the figures' PDF fonts would log hundreds of fontTools lines at Hydra's INFO level
    sweep = load_sweep(root)
    out = sweep.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    columns, rows = results_table(sweep)
    write_csv(out / "results.csv", columns, rows)
    points = sweep_points(sweep) if sweep.jobs else []
    atomic_write_json(out / "points.json", [p.to_dict() for p in points])
    atomic_write_json(out / "failed.json", sweep.failed)
    group = group or sweep_group(sweep.root)
    # One report run per sweep folder: a fixed id, resumed by every later report of the same sweep, so that a
    # relaunch or a rerun of the report updates the group's report run instead of adding another.
    tracker = make_tracker(tracker_kind, out, project=project, entity=entity, group=group, job_type="sweep-report",
                           tags=["sweep-report"], name=f"{group}-report",
                           run_id="report-" + hashlib.sha256(group.encode()).hexdigest()[:16],
                           config={"sweep_dir": str(sweep.root), "jobs": len(sweep.jobs)}, mode=mode)
    try:
        tracker.log_table("sweep/results", columns, rows)
        tracker.log_table("sweep/pareto", list(points[0].to_dict()) if points else [],
                          [list(p.to_dict().values()) for p in points])
        if figures and sweep.jobs:
            import matplotlib.pyplot as plt

            from alignment.figures import sweep_charts

            for name, (fig, _) in sweep_charts(sweep, points).items():
                tracker.log_figure(f"sweep/{name}_plot", fig)
                plt.close(fig)
    finally:
        tracker.finish({"sweep/jobs": len(sweep.jobs), "sweep/failed": len(sweep.failed),
                        "sweep/results_csv": str(out / "results.csv")})
    reused = sum(1 for job in sweep.jobs if job.summary.get("resumed_from"))
    return SweepReportResult(out / "results.csv", len(sweep.jobs), reused, sweep.failed, points)


def main() -> None:
    parser = argparse.ArgumentParser(description="Aggregate a sweep folder into results.csv, Pareto fronts and charts.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--wandb", action="store_true", help="also log a sweep-level W&B run")
    parser.add_argument("--group", default=None, help="W&B group (default: the sweep's group, as its jobs had)")
    args = parser.parse_args()
    result = report_sweep(args.sweep_dir, tracker_kind="wandb" if args.wandb else "none", group=args.group)
    for p in result.points:
        print(f"{p.label:18} margin {list(p.margin)}  reward {p.reward_gain:+.3f} {p.reward_ci}  "
              f"safety {p.safety_gain:+.3f} {p.safety_ci}  {'front' if p.on_front else ''}")
    print(f"{result.jobs} jobs ({result.reused} reused), {len(result.failed)} failed -> {result.results_csv}")
    for failure in result.failed:
        print("failed:", failure)
    raise SystemExit(1 if result.failed else 0)


if __name__ == "__main__":
    main()
