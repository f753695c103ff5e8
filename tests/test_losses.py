"""The stage-2 loss: hand-worked values and its optimum at π_λ."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alignment.losses import preference_labels, preference_metrics, pseudo_preference_loss

pytestmark = pytest.mark.fast  # the developers' tier (make test-fast)


def test_hand_worked_value():
    """ρ1 - ρ0 = 2, β = 0.5 -> h = 1; p = 0.75: loss = -(0.75 log σ(1) + 0.25 log σ(-1)).

    log σ(1) = -0.31326, log σ(-1) = -1.31326 -> loss = 0.75·0.31326 + 0.25·1.31326 = 0.56326.
    """
    loss = pseudo_preference_loss(torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([0.75]), 0.5)
    assert loss.item() == pytest.approx(0.75 * 0.3132617 + 0.25 * 1.3132617, rel=1e-6)


def test_hard_label_is_dpo():
    rho_1, rho_0 = torch.tensor([0.3, -1.0]), torch.tensor([0.1, 0.5])
    beta = 0.1
    dpo = -torch.nn.functional.logsigmoid(beta * (rho_1 - rho_0))
    torch.testing.assert_close(pseudo_preference_loss(rho_1, rho_0, torch.ones(2), beta), dpo)


def test_minimum_at_composite_reward_difference():
    """For one pair the loss in h is minimised where σ(h) = p, i.e. β Δρ = Δr_λ."""
    delta_r = torch.tensor(0.8)
    p = preference_labels(delta_r, torch.tensor(0.0), mode="soft")
    beta = 0.25
    grid = torch.linspace(-10, 10, 20001)
    losses = pseudo_preference_loss(grid, torch.zeros_like(grid), p.expand_as(grid), beta)
    best = grid[losses.argmin()]
    assert beta * best.item() == pytest.approx(0.8, abs=2e-3)


def test_sampled_labels_are_bernoulli_with_soft_mean():
    g = torch.Generator().manual_seed(0)
    r1 = torch.full((20000,), 1.0)
    labels = preference_labels(r1, torch.zeros_like(r1), mode="sampled", generator=g)
    assert set(labels.unique().tolist()) <= {0.0, 1.0}
    assert labels.mean().item() == pytest.approx(1 / (1 + math.exp(-1)), abs=0.01)
    with pytest.raises(ValueError, match="labels"):
        preference_labels(r1, r1, mode="hard")


def test_metrics():
    m = preference_metrics(torch.tensor([1.0, -1.0, 0.0]), torch.zeros(3), torch.tensor([0.9, 0.8, 0.5]), 2.0)
    assert m["reward_margin"] == pytest.approx(0.0)
    assert m["label_accuracy"] == pytest.approx(0.5)  # the tie label (0.5) is not counted


def test_listwise_loss_hand_worked_and_at_its_minimum():
    import math

    from alignment.losses import listwise_loss, listwise_metrics

    target = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)  # q = (1/4, 3/4)
    flat = torch.zeros_like(target)  # p = (1/2, 1/2)
    assert float(listwise_loss(flat, target)) == pytest.approx(math.log(2.0), rel=1e-12)
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert listwise_metrics(flat, target)["kl_to_target"] == pytest.approx(math.log(2.0) - entropy, rel=1e-12)
    # At ρ = t + c the loss is the entropy of q (KL 0), for any constant c.
    assert listwise_metrics(target + 5.0, target)["kl_to_target"] == pytest.approx(0.0, abs=1e-12)
    # Exact lists weigh by π_ref: q ∝ (0.8, 0.2·3), p = π_ref when ρ = 0.
    base = torch.log(torch.tensor([[0.8, 0.2]], dtype=torch.float64))
    expected = -(4 / 7 * math.log(0.8) + 3 / 7 * math.log(0.2))
    assert float(listwise_loss(flat, target, base)) == pytest.approx(expected, rel=1e-12)
    # The gradient with respect to ρ is p - q.
    rho = flat.clone().requires_grad_(True)
    listwise_loss(rho, target).sum().backward()
    torch.testing.assert_close(rho.grad, torch.tensor([[0.25, -0.25]], dtype=torch.float64))


def test_listwise_log_mass_is_the_constant_the_loss_does_not_see():
    """log Σ_k w_k e^{ρ_k}: every ratio halved leaves the loss unchanged and reads log 1/2 (hand value); on an
    exact list a normalised policy reads 0."""
    import math

    from alignment.losses import listwise_loss, listwise_metrics

    target = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    halved = torch.full_like(target, math.log(0.5))
    assert float(listwise_loss(halved, target)) == pytest.approx(math.log(2.0), rel=1e-12)  # as ρ = 0
    assert listwise_metrics(halved, target)["log_mass"] == pytest.approx(math.log(0.5), rel=1e-12)
    base = torch.log(torch.tensor([[0.8, 0.2]], dtype=torch.float64))
    normalised = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64)) - base
    assert listwise_metrics(normalised, target, base)["log_mass"] == pytest.approx(0.0, abs=1e-15)


def test_listwise_anchor_fixes_the_constant_and_only_the_constant():
    """η m², m = log Σ_k w_k e^{ρ_k}: a hand value, its gradient, its minimiser ρ = t - log mean e^t (the
    cross-entropy's minimisers are t + c; the anchor picks c), and no effect on an exact list, where m = 0."""
    import math

    from alignment.losses import listwise_loss

    target = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    halved = torch.full_like(target, math.log(0.5))  # every ratio halved: m = log 1/2, the weights unchanged
    plain = float(listwise_loss(halved, target))
    assert float(listwise_loss(halved, target, anchor=2.0)) == pytest.approx(plain + 2.0 * math.log(2.0) ** 2,
                                                                             rel=1e-12)
    # d(η m²)/dρ_k = 2 η m softmax(ρ)_k: with ρ flat, 2·2·log(1/2)·1/2 added to p - q = (1/4, -1/4).
    rho = halved.clone().requires_grad_(True)
    listwise_loss(rho, target, anchor=2.0).sum().backward()
    part = 2.0 * math.log(0.5)
    torch.testing.assert_close(rho.grad, torch.tensor([[0.25 + part, -0.25 + part]], dtype=torch.float64))
    # Minimising over ρ from 0 reaches t - log mean e^t: the weights and the constant.
    rho = torch.zeros_like(target, requires_grad=True)
    opt = torch.optim.LBFGS([rho], max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16)

    def closure():
        opt.zero_grad()
        loss = listwise_loss(rho, target, anchor=1.0).sum()
        loss.backward()
        return loss

    opt.step(closure)
    expected = target - torch.logsumexp(target, dim=-1, keepdim=True) + math.log(2.0)
    torch.testing.assert_close(rho.detach(), expected, atol=1e-8, rtol=0)  # L-BFGS to a 1e-14 gradient
    # Exact list over the whole support: a normalised π_θ has m = 0, so the anchor adds nothing.
    base = torch.log(torch.tensor([[0.8, 0.2]], dtype=torch.float64))
    normalised = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64)) - base
    assert float(listwise_loss(normalised, target, base, anchor=5.0)) == pytest.approx(
        float(listwise_loss(normalised, target, base)), rel=1e-12)


def test_all_pairs_are_every_distinct_pair_once():
    from alignment.items import make_pairs

    responses = np.arange(8).reshape(2, 4)
    scores = np.random.default_rng(0).normal(size=(2, 4))
    pairs = make_pairs(responses, scores, None, pairs_per_prompt=3, labels="soft",
                       generator=torch.Generator().manual_seed(0), all_pairs=True)
    assert len(pairs["label"]) == 2 * 6
    for x in range(2):
        mine = {(int(a), int(b)) for p, a, b in zip(pairs["prompt"], pairs["y1"], pairs["y0"]) if int(p) == x}
        assert len(mine) == 6 and all(a != b and a // 4 == x and b // 4 == x for a, b in mine)
        assert len({frozenset(p) for p in mine}) == 6


def test_sampled_pairs_never_pair_a_sample_with_itself():
    from alignment.items import make_pairs

    responses = np.arange(40).reshape(10, 4)
    pairs = make_pairs(responses, np.zeros((10, 4)), None, pairs_per_prompt=64, labels="soft",
                       generator=torch.Generator().manual_seed(0))
    assert len(pairs["label"]) == 640 and bool((pairs["y1"] != pairs["y0"]).all())
    assert bool((pairs["y1"] // 4 == pairs["prompt"]).all() and (pairs["y0"] // 4 == pairs["prompt"]).all())
    # Every ordered pair of distinct positions turns up: 12 per prompt.
    assert len({(int(a), int(b)) for a, b in zip(pairs["y1"], pairs["y0"])}) == 10 * 12
