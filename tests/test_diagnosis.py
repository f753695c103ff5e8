"""The diagnosis line: a missed margin is attributed to the first link of predicted -> fit -> in-sample ->
held-out whose own numbers fail (alignment/diagnosis.py)."""

from __future__ import annotations

import pytest

from alignment.diagnosis import diagnose
from alignment.experiment import format_report

pytestmark = pytest.mark.fast


def summary(**over):
    """A missed run: predicted 0.15 [0.13, 0.17]; good fit; in-sample and held-out on the prediction."""
    base = {"eval/constraint_met": False, "predicted/safety_gain_ci": [[0.13], [0.17]],
            "fit/corr": 0.95, "fit/slope": 1.0, "fit/log_mass": -0.05,
            "insample/safety_gain_ci": [[0.10], [0.20]], "eval/safety_gain_ci": [[0.08], [0.20]]}
    return {**base, **over}


def test_met_or_unpredicted_runs_have_no_diagnosis():
    assert diagnose(summary(**{"eval/constraint_met": True})) is None
    assert diagnose(summary(**{"predicted/safety_gain_ci": None})) is None


@pytest.mark.parametrize(("over", "starts"), [
    ({"fit/corr": 0.42}, "fit on the dual's samples"),
    ({"fit/slope": 1.5}, "fit on the dual's samples"),
    ({"fit/slope": 0.7}, "fit on the dual's samples"),
    # in-sample upper bound 0.12 < predicted lower bound 0.13: significantly short with a good fit
    ({"insample/safety_gain_ci": [[0.0], [0.12]]}, "estimation"),
    ({"eval/safety_gain_ci": [[0.0], [0.12]]}, "generalisation to new prompts"),
    ({"eval/safety_gain_ci": [[0.0], [0.13]]}, "none significantly"),  # touching the interval is overlapping
    ({}, "none significantly"),
])
def test_the_first_failing_link_is_named(over, starts):
    assert diagnose(summary(**over)).startswith(starts)


def test_fit_is_named_before_estimation_and_generalisation():
    """A poor fit explains a short in-sample gain and a short held-out one: it is named, not what follows it."""
    s = summary(**{"fit/corr": 0.5, "insample/safety_gain_ci": [[0.0], [0.05]],
                   "eval/safety_gain_ci": [[0.0], [0.05]]})
    assert diagnose(s).startswith("fit")


def test_generalisation_needs_an_in_sample_measurement():
    """Without in-sample gains, a short held-out gain cannot be told from a short in-sample one."""
    s = summary(**{"insample/safety_gain_ci": None, "eval/safety_gain_ci": [[0.0], [0.05]]})
    assert diagnose(s).startswith("none significantly")


def test_the_report_prints_the_line():
    s = {"algorithm": "mocan", "margin": [0.15], "beta": 0.1, "dual/lambda": [1.0], "predicted/kl": [1.0],
         "eval/kl": 1.0, "eval/constraint_met": False, "compute/training_runs": None,
         "eval/diagnosis": "fit on the dual's samples: ..."}
    lines = format_report(s).splitlines()
    met = next(i for i, line in enumerate(lines) if line.startswith("constraint met"))
    assert lines[met + 1] == "  the gap points to fit on the dual's samples: ..."
