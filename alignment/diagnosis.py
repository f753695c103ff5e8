"""Which part of the method a missed margin points to, from the numbers a run already has.

A run towards π_λ* predicts its safety gain from π_ref's K samples per dual prompt (``predicted/*``), trains,
and measures the gain three ways (docs/stage2.md, "the tools"):

    predicted ──estimation──> π_λ* itself ──fit──> the policy on the dual's prompts ──generalisation──> held out
                                               (fit/*: on the dual's own samples; insample/*: fresh samples)

When the held-out gain misses the margin, :func:`diagnose` names the first link whose own numbers fail:

1. **fit on the dual's samples**: the policy's log-ratios ρ do not follow r_λ/β on the very samples it was
   trained on: within-prompt correlation below ``FIT_CORR`` or slope outside ``FIT_SLOPE``. Stage 2 did not reach
   its target where it was shown it; more steps, data or a better-posed target (longer lists, larger β) are the
   remedies.
2. **estimation**: the fit on the samples is good, yet fresh samples of the policy on the same prompts
   (``insample/*``) fall short of the prediction: their interval lies wholly below the predicted interval. What
   K samples say of π_λ* is not what the policy does off them: the K-sample estimate (a larger K re-estimates
   it: ``bench/stage2_study.py --reestimate``) or probability moved onto responses stage 2 never saw
   (``fit/log_mass``).
3. **generalisation to new prompts**: in-sample gains reach the predicted interval, held-out ones lie wholly
   below it: the dual's prompts are too few or unlike the held-out ones.
4. **none significantly**: every interval overlaps the predicted one; the miss is within the evaluation's noise
   (more held-out prompts or samples would decide).

Thresholds: a fit slope within [0.8, 1.2] and a correlation of at least 0.8 are what the toy world's fits reach
when they land inside the predicted interval (docs/stage2.md: slopes 0.88-0.95, correlations 0.93-0.98), and the
interval tests use the run's own 95% bootstrap intervals, so "short" means significantly short.
"""

from __future__ import annotations

from typing import Any

FIT_CORR = 0.8  # within-prompt correlation of ρ with r_λ/β below which the fit itself is the gap
FIT_SLOPE = (0.8, 1.2)  # within-prompt slope of ρ on r_λ/β outside which the fit itself is the gap


def _first(value: Any) -> float:
    return float(value[0] if isinstance(value, (list, tuple)) else value)


def _below(interval: Any, bound: float) -> bool:
    """Whether an interval [lo, hi] (per constraint: the first) lies wholly below ``bound``."""
    return interval is not None and _first(interval[1]) < bound


def diagnose(summary: dict[str, Any]) -> str | None:
    """One line naming where a missed margin's gap is (module docstring), or None when the margin was met or the
    run has no prediction to compare with."""
    if summary.get("eval/constraint_met", True) or summary.get("predicted/safety_gain_ci") is None:
        return None
    predicted_lo = _first(summary["predicted/safety_gain_ci"][0])
    corr, slope = summary.get("fit/corr"), summary.get("fit/slope")
    if corr is not None and (corr < FIT_CORR or not FIT_SLOPE[0] <= slope <= FIT_SLOPE[1]):
        return (f"fit on the dual's samples: the policy's log-ratios follow r_λ/β with corr {corr:.2f} and slope "
                f"{slope:.2f} on its own training samples (a fit that holds: corr >= {FIT_CORR}, slope in "
                f"[{FIT_SLOPE[0]}, {FIT_SLOPE[1]}]); more stage-2 data or steps (docs/stage2.md)")
    insample = summary.get("insample/safety_gain_ci")
    if _below(insample, predicted_lo):
        mass = summary.get("fit/log_mass")
        return ("estimation: the fit on the dual's samples holds, but fresh samples on the same prompts gain "
                f"significantly less than predicted (in-sample interval below {predicted_lo:.4f})"
                + (f"; log-mass {mass:+.2f} says how much probability moved off the samples" if mass is not None
                   else "") + "; re-estimate with more samples per prompt (bench/stage2_study.py --reestimate)")
    if insample is not None and _below(summary.get("eval/safety_gain_ci"), predicted_lo):
        return ("generalisation to new prompts: in-sample gains reach the predicted interval, held-out gains lie "
                "below it; more or more varied dual prompts (dataset.n_prompts)")
    return ("none significantly: the in-sample and held-out intervals overlap the predicted one; the miss is "
            "within the evaluation's noise (more eval.num_samples or held-out prompts would decide)")
