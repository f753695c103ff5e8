"""A sweep folder, loaded: its jobs (``Job``, ``Sweep``, ``load_sweep``), the W&B group they share
(``sweep_group``) and one point per configuration over seeds with intervals and Pareto fronts (``Point``,
``sweep_points``).

The report (alignment/report.py), the figures (alignment/figures.py), the multirun jobs (run.py) and the
sweep callback (alignment/hydra_app.py) all read sweeps through this module, so none of them imports another
to get at a sweep. (The YAML definitions of named multiruns are in the top-level ``sweeps/`` folder; this
module reads the folders their runs write.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alignment.intervals import hierarchical_interval

# ----------------------------------------------------------------------------------------------------------
# Loading


def sweep_group(sweep_dir: str | Path) -> str:
    """The W&B group of a multirun's jobs and of its report run, from the sweep folder's identity (its resolved
    path), so that the jobs and a later ``python -m alignment.report <folder>`` agree however the folder is
    written: ``sweep-<its last two path parts>-<8 hex digits of the resolved path>``, e.g.
    ``sweep-2026-11-30-10-00-00-1a2b3c4d`` for the default ``outputs/multirun/<date>/<time>``."""
    path = Path(sweep_dir).resolve()
    return f"sweep-{'-'.join(path.parts[-2:])}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


@dataclass
class Job:
    run_dir: Path
    summary: dict[str, Any]

    @property
    def label(self) -> str:
        return self.summary.get("algorithm/label") or self.summary["algorithm"]

    @property
    def margin(self) -> tuple[float, ...]:
        return tuple(self.summary["margin"])

    def arrays(self) -> dict[str, np.ndarray]:
        path = self.run_dir / "arrays.npz"
        if not path.exists():
            return {}
        with np.load(path) as data:
            return {k: data[k] for k in data.files}


@dataclass
class Sweep:
    root: Path
    jobs: list[Job]  # completed
    failed: list[str] = field(default_factory=list)  # "<dir>: <status or error>"

    def by_label(self) -> dict[str, list[Job]]:
        out: dict[str, list[Job]] = {}
        for job in self.jobs:
            out.setdefault(job.label, []).append(job)
        return out


def load_sweep(root: str | Path) -> Sweep:
    """Every job under ``root``: Hydra job folders (with ``.hydra/``) and any folder with a ``summary.json``.
    A job without a completed summary is a failure (it crashed, was killed, or its margin was infeasible)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep folder {str(root)!r} does not exist")
    folders = {p.parent for p in root.rglob(".hydra") if p.is_dir()} | {p.parent for p in root.rglob("summary.json")}
    folders = {f for f in folders if f != root and "report" not in f.relative_to(root).parts}
    jobs, failed = [], []
    for folder in sorted(folders, key=_job_order):
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except (OSError, ValueError):
            failed.append(f"{folder}: no summary (the job crashed or never started)")
            continue
        if summary.get("status") == "completed":
            jobs.append(Job(folder, summary))
        else:
            failed.append(f"{folder}: {summary.get('status')}: {summary.get('error', '')}")
    return Sweep(root, jobs, failed)


def _job_order(path: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in path.parts)


# ----------------------------------------------------------------------------------------------------------
# Points with intervals over seeds and prompts, and Pareto fronts


@dataclass
class Point:
    """One configuration of one algorithm (all its seeds): mean gains and intervals over seeds and prompts."""

    label: str
    margin: tuple[float, ...]
    lam: list[float] | None
    seeds: int
    reward_gain: float
    safety_gain: float  # first constraint
    reward_ci: tuple[float, float]
    safety_ci: tuple[float, float]
    predicted_safety_gain: float | None
    predicted_safety_ci: tuple[float, float] | None
    constraint_met: bool
    compute_tokens: float  # forward + backward, mean over seeds
    violation: float  # max(0, margin - achieved safety gain)
    on_front: bool = False
    # Fresh samples on the dual's prompts (insample/*, first constraint): mean over seeds; interval with one seed.
    insample_safety_gain: float | None = None
    insample_safety_ci: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """Non-dominated rows of [P, 2] (both coordinates maximised): no other point is >= in both and > in one."""
    keep = np.ones(len(points), dtype=bool)
    for i, p in enumerate(points):
        others = np.delete(points, i, axis=0)
        keep[i] = not np.any(np.all(others >= p, axis=1) & np.any(others > p, axis=1))
    return keep


def sweep_points(sweep: Sweep, level: float = 0.95) -> list[Point]:
    """One point per (algorithm label, margin, λ for fixed-λ grids), over seeds; fronts marked per algorithm."""
    groups: dict[tuple, list[Job]] = {}
    for job in sweep.jobs:
        lam_key = tuple(job.summary["dual/lambda"] or []) if job.summary["algorithm"] == "fixed_lambda" else ()
        groups.setdefault((job.label, job.margin, lam_key), []).append(job)
    points = []
    for (label, margin, _), jobs in groups.items():
        arrays = [job.arrays() for job in jobs]
        s = [job.summary for job in jobs]
        reward = float(np.mean([x["eval/reward_gain"] for x in s]))
        safety = float(np.mean([x["eval/safety_gain"][0] for x in s]))
        if len(jobs) > 1 and all("eval_reward_draws" in a for a in arrays):
            reward_ci = hierarchical_interval([a["eval_reward_draws"] for a in arrays], level)
            safety_ci = hierarchical_interval([a["eval_safety_draws"][:, 0] for a in arrays], level)
        else:  # one seed: the run's own prompt interval, exactly as its summary has it
            reward_ci = tuple(s[0]["eval/reward_gain_ci"])
            safety_ci = (s[0]["eval/safety_gain_ci"][0][0], s[0]["eval/safety_gain_ci"][1][0])
        predicted = [x["predicted/safety_gain"][0] for x in s if x.get("predicted/safety_gain") is not None]
        pred_ci = s[0].get("predicted/safety_gain_ci")
        insample = [x["insample/safety_gain"][0] for x in s if x.get("insample/safety_gain") is not None]
        insample_ci = s[0].get("insample/safety_gain_ci")
        points.append(Point(
            label=label, margin=margin, lam=s[0]["dual/lambda"], seeds=len(jobs), reward_gain=reward,
            safety_gain=safety, reward_ci=reward_ci, safety_ci=safety_ci,
            predicted_safety_gain=float(np.mean(predicted)) if predicted else None,
            predicted_safety_ci=(pred_ci[0][0], pred_ci[1][0]) if pred_ci and len(jobs) == 1 else None,
            constraint_met=all(x["eval/constraint_met"] for x in s),
            compute_tokens=float(np.mean([x["compute/forward_tokens"] + x["compute/backward_tokens"] for x in s])),
            violation=max(0.0, margin[0] - safety),
            insample_safety_gain=float(np.mean(insample)) if len(insample) == len(s) else None,
            insample_safety_ci=(insample_ci[0][0], insample_ci[1][0]) if insample_ci and len(jobs) == 1 else None,
        ))
    for label in {p.label for p in points}:
        members = [p for p in points if p.label == label]
        mask = pareto_mask(np.array([[p.reward_gain, p.safety_gain] for p in members]))
        for p, on in zip(members, mask):
            p.on_front = bool(on)
    return sorted(points, key=lambda p: (p.label, p.margin))
