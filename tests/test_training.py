"""The training loop: gradient accumulation is exact, and a killed run resumes to the same weights."""

from __future__ import annotations

import pytest
import torch

from alignment.config import TrainerConfig
from alignment.worlds.tabular import TabularPolicy, make_tables

pytestmark = pytest.mark.fast  # the developers' tier (make test-fast)


def _setup():
    world = make_tables(30, 6, 1, 0.6, 1.0, 0)
    g = torch.Generator().manual_seed(0)
    n = 30 * 20
    pairs = {"prompt": torch.arange(30).repeat_interleave(20), "y1": torch.randint(0, 6, (n,), generator=g),
             "y0": torch.randint(0, 6, (n,), generator=g), "label": torch.rand(n, generator=g, dtype=torch.float64)}

    def logratios(policy, batch):
        x = batch["prompt"]
        return (policy.log_prob(x, batch["y1"]) - policy.ref_log_prob(x, batch["y1"]),
                policy.log_prob(x, batch["y0"]) - policy.ref_log_prob(x, batch["y0"]))

    return world, pairs, logratios


def _train(cfg, **kwargs):
    from alignment.training import train_pairs

    world, pairs, logratios = _setup()
    policy = TabularPolicy(world.ref_logits)
    result = train_pairs(policy, pairs, logratios, beta=0.5, cfg=cfg, seed=3, progress=False, **kwargs)
    return policy.logits.detach().clone(), result


def test_gradient_accumulation_matches_one_big_batch():
    a, _ = _train(TrainerConfig(lr=0.1, epochs=2, batch_size=64, grad_accum=1))
    b, _ = _train(TrainerConfig(lr=0.1, epochs=2, batch_size=64, grad_accum=4))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_resume_from_checkpoint_gives_the_same_weights(tmp_path):
    cfg = TrainerConfig(lr=0.1, epochs=3, batch_size=64, checkpoint_every=4, log_every=1, scheduler="cosine")
    full, full_result = _train(cfg)

    class Crash(Exception):
        pass

    def crash_at_step_11(row, step):
        if step == 11:  # after the checkpoint at step 8, mid-epoch (10 steps per epoch)
            raise Crash

    with pytest.raises(Crash):
        _train(cfg, checkpoint_dir=tmp_path, log=crash_at_step_11)
    assert sorted(p.name for p in tmp_path.glob("step-*.pt")) == ["step-00000004.pt", "step-00000008.pt"]
    resumed, result = _train(cfg, checkpoint_dir=tmp_path)
    torch.testing.assert_close(resumed, full, rtol=0, atol=1e-12)
    assert result.steps == full_result.steps == 30
    assert [h["step"] for h in result.history] == list(range(1, 31))


def test_checkpoint_at_epoch_boundary_resumes_next_epoch_order(tmp_path):
    cfg = TrainerConfig(lr=0.1, epochs=3, batch_size=64, checkpoint_every=10, log_every=1)
    full, _ = _train(cfg)

    def crash(row, step):
        if step == 12:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        _train(cfg, checkpoint_dir=tmp_path, log=crash)
    resumed, _ = _train(cfg, checkpoint_dir=tmp_path)
    torch.testing.assert_close(resumed, full, rtol=0, atol=1e-12)
