"""The Lagrange multiplier component on its own: update rules, clamping, delay and window."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignment.config import MultiplierConfig
from alignment.multiplier import LagrangeMultiplier

pytestmark = pytest.mark.fast  # the developers' tier (make test-fast)


def test_projected_sgd_step_by_hand():
    """λ = 1, lr = 0.5, slack -0.4 (violated) -> λ = 1 + 0.2 = 1.2; slack +4 -> clipped at 0."""
    lam = LagrangeMultiplier(MultiplierConfig(init=1.0, lr=0.5, log_space=False))
    assert lam.update(-0.4)[0] == pytest.approx(1.2)
    assert lam.update(4.0)[0] == 0.0


def test_log_space_step_by_hand():
    """log λ ← log 1 - 0.1 · 1 · (-2) = 0.2 -> λ = e^0.2; growth is capped at max."""
    lam = LagrangeMultiplier(MultiplierConfig(init=1.0, lr=0.1, max=5.0))
    assert lam.update(-2.0)[0] == pytest.approx(math.exp(0.2))
    for _ in range(200):
        lam.update(-2.0)
    assert lam.value[0] == 5.0
    for _ in range(2000):
        lam.update(1.0)
    # Stays positive in log space; the λ factor in the gradient makes the decay ~1/(lr·t): 1/(0.1·2000).
    assert 0 < lam.value[0] < 0.01


def test_delay_and_window():
    lam = LagrangeMultiplier(MultiplierConfig(init=1.0, lr=1.0, log_space=False, delay=2, window=3))
    assert lam.update(-1.0)[0] == 1.0 and lam.update(-1.0)[0] == 1.0  # within the delay: no step
    assert lam.update(2.0)[0] == pytest.approx(1.0)  # mean of (-1, -1, 2) = 0
    assert lam.update(2.0)[0] == pytest.approx(0.0)  # mean of (-1, 2, 2) = 1


def test_vector_and_bad_input():
    lam = LagrangeMultiplier(MultiplierConfig(init=0.5, lr=1.0, log_space=False), m=2)
    np.testing.assert_allclose(lam.update([-0.5, 0.25]), [1.0, 0.25])
    with pytest.raises(ValueError, match="finite"):
        lam.update([np.nan, 0.0])
    with pytest.raises(ValueError, match="init"):
        MultiplierConfig(init=0.0, log_space=True)
    with pytest.raises(ValueError):
        MultiplierConfig(init=6.0, max=5.0)


def test_converges_to_the_dual_solution_on_a_tabular_problem():
    """Dual ascent with exact slacks of π_λ reaches the same λ* as the Newton solver."""
    from alignment.dual import dual_terms, solve_dual
    from alignment.worlds.tabular import make_tables

    world = make_tables(50, 8, 1, 0.6, 1.0, 0)
    star = solve_dual(world.reward, world.safety, 0.4, 0.5, ref_logprob=world.ref_logits).lam[0]
    lam = LagrangeMultiplier(MultiplierConfig(init=0.1, lr=0.5, log_space=False, max=10.0))
    for _ in range(3000):
        slack = dual_terms(world.reward, world.safety, 0.4, 0.5, lam.value, ref_logprob=world.ref_logits).grad
        lam.update(slack)
    assert lam.value[0] == pytest.approx(star, rel=1e-4)
