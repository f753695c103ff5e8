"""Training across processes: 2 CPU processes (gloo) under ``accelerate launch`` on the toy world, with each
engine (DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3), give the same losses and adapter as one process with the same
global batch; rank 0 alone writes outputs and caches."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignment.distributed import Distributed, engine_from_env, launcher_argv

ROOT = Path(__file__).resolve().parents[1]
# A toy world small enough for a test: 30 dual prompts x 4 samples, 120 pairs, 8 optimiser steps of 16 pairs.
# trainer.share_prompt=false: a launch runs each micro-batch as one flat forward (policies.shares_prompt), and
# the single process it is compared with must do the same arithmetic.
TOY = ["experiment=toy", "trainer.share_prompt=false", "dataset.n_prompts=40", "model.sft_steps=20", "sampling.num_samples=4",
       "algorithm.objective=pairwise", "algorithm.pairs_per_prompt=4", "trainer.batch_size=16", "trainer.epochs=1",
       "trainer.log_every=1", "trainer.warmup_steps=0", "eval.num_samples=1", "eval.bootstrap=50", "tracker=none", "model.device=cpu"]


@pytest.mark.fast
def test_shards_cover_every_item_once():
    for n in range(0, 9):
        for world in (1, 2, 3):
            parts = [list(range(n))[Distributed(rank=r, world_size=world).shard(n)] for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.fast
def test_prompt_sharing_is_off_under_a_launch(monkeypatch):
    """Every forward of a launch is a collective and ranks hold different numbers of prompts: sharing the
    prompt's forward (a forward per prompt) would leave ranks waiting on each other (it hung DDP)."""
    from alignment import distributed as dist_mod
    from alignment.policies import shares_prompt

    assert shares_prompt(True) and not shares_prompt(False)
    monkeypatch.setattr(dist_mod, "current", lambda: Distributed(rank=1, world_size=2))
    assert not shares_prompt(True)


@pytest.mark.fast
def test_launcher_argv_strips_local_rank_and_sends_other_ranks_to_scratch():
    env: dict[str, str] = {}
    assert launcher_argv(["run.py", "--local_rank=1", "a=1"], env) == ["run.py", "a=1"]
    assert env["LOCAL_RANK"] == "1"
    env = {}
    assert launcher_argv(["run.py", "--local-rank", "3", "a=1"], env) == ["run.py", "a=1"]
    assert env["LOCAL_RANK"] == "3"
    argv = launcher_argv(["run.py", "a=1"], {"RANK": "1"})
    assert argv[:2] == ["run.py", "a=1"]
    assert "hydra.output_subdir=null" in argv and "hydra/job_logging=disabled" in argv
    assert any(a.startswith("hydra.run.dir=") and "alignment-ranks" in a for a in argv)
    assert launcher_argv(["run.py", "a=1"], {"RANK": "0"}) == ["run.py", "a=1"]  # rank 0 is untouched
    with pytest.raises(SystemExit, match="multirun"):
        launcher_argv(["run.py", "-m", "a=1,2"], {"RANK": "1"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def _accelerate(config: str, *args: str) -> None:
    """``accelerate launch`` of run.py with conf/accelerate/<config>.yaml on a free port (the venv's bin on
    PATH: the launcher starts its workers by name)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    _run([str(accelerate), "launch", "--config_file", f"conf/accelerate/{config}.yaml", "--main_process_port",
          str(_free_port()), "run.py", *args], {**ENV, "PATH": f"{Path(sys.executable).parent}:{ENV['PATH']}"})


def _steps(run_dir: Path) -> list[dict[str, float]]:
    """The logged optimiser steps (loss and pre-clipping gradient norm of each global batch)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return load_file(str(Path(summary["train/adapter"]) / "adapter_model.safetensors"))


# How close a launch must land to one process on the same global batches, and why.
#
# float32 rounds every operation to a relative u = 2^-24. The two runs do the same arithmetic on the same pairs,
# with micro-batches of the same shapes, except where partial results are combined: one process adds its four
# micro-batches' gradients in turn, two ranks add two each and then average over the ranks (all-reduce, and for
# FSDP and ZeRO a reduce-scatter over flattened, sharded buckets), and the sharded engines sum the gradient norm
# shard by shard. Reordering a float sum of n terms moves it by at most (n - 1)·u of the sum of their magnitudes
# (Higham's bound), so:
#
# - Step 1 starts from identical weights (the LoRA initialisation is seeded): its loss agrees to the float64
#   average of 16 identical per-pair losses (1e-15), and its gradient norm, a sum of P squared coordinates of
#   gradients that agree to a few ulps, to a relative (P + 4)·u / 2 (P = 16,384 adapter weights: 5e-4).
# - From step 2 the weights differ by Adam's answer to those ulps. Adam divides each coordinate's step by the
#   root mean square of its own gradients, so a coordinate whose gradient is near zero, where a few ulps are a
#   large relative change, still moves by up to lr: float noise becomes lr-sized moves of a few coordinates, and
#   no bound of the form "ulps x constant" holds for the trajectory. The test measures that noise instead, in
#   the same run: a twin of the single process with another, equally valid split of each global batch (two
#   micro-batches of 8 instead of four of 4) does the same sums in another order. From step 2 a launch may
#   differ from the single process by at most NOISE_FACTOR times the twin's largest deviation over steps 2-8
#   (a launch reorders at a few more places than the twin: the all-reduce, the sharded norm, the flattened
#   buckets), and never by less than the step-1 bound. Over the whole run, not "so far": two noise sources
#   need not grow in step, and on one rounding draw ZeRO-2's step-2 loss moved 4.2e-7 while the twin's moved
#   2.6e-8 at step 2 and 1.2e-6 at step 3 (ZeRO-2's 6.6e-7 there), with identical step-1 numbers.
#
# What bugs do, measured on the toy world with DDP and ZeRO-2 (two ranks, two micro-batches each): dropping the
# world-size factor from the loss halves every gradient norm (relative 0.5 from step 1; the twin's noise is
# 2e-5 at most), and reducing the gradients on the first micro-batch instead of the last changes the norm by
# 0.12-0.38 at step 1 and the loss by 3e-3-2e-2 within 8 steps (the twin's: 1.4e-6).
U = 2.0 ** -24
NOISE_FACTOR = 10.0


def _assert_trains_like_one_process(reference: Path, twin: Path, run: Path) -> None:
    ref, tw, got = _steps(reference), _steps(twin), _steps(run)
    assert len(ref) == len(tw) == len(got) == 8, (len(ref), len(tw), len(got))
    n_weights = sum(w.numel() for w in _adapter(reference).values())
    loss_floor, norm_floor = 1e-15, (n_weights + 4) * U / 2
    # The twin's largest deviation from step 2 on: how far float noise alone carries a run on these batches.
    loss_noise = max([loss_floor] + [abs(t["train/loss"] - r["train/loss"]) / abs(r["train/loss"])
                                     for r, t in zip(ref[1:], tw[1:])])
    norm_noise = max([norm_floor] + [abs(t["train/grad_norm"] - r["train/grad_norm"]) / r["train/grad_norm"]
                                     for r, t in zip(ref[1:], tw[1:])])
    for step, (r, g) in enumerate(zip(ref, got), start=1):
        loss_dev = abs(g["train/loss"] - r["train/loss"]) / abs(r["train/loss"])
        norm_dev = abs(g["train/grad_norm"] - r["train/grad_norm"]) / r["train/grad_norm"]
        if step == 1:  # identical weights: the float bounds themselves
            assert loss_dev <= loss_floor, (step, "loss", loss_dev, loss_floor)
            assert norm_dev <= norm_floor, (step, "grad norm", norm_dev, norm_floor)
        else:
            assert loss_dev <= NOISE_FACTOR * loss_noise, (step, "loss", loss_dev, loss_noise)
            assert norm_dev <= NOISE_FACTOR * norm_noise, (step, "grad norm", norm_dev, norm_noise)
    w_ref, w_twin, w_got = _adapter(reference), _adapter(twin), _adapter(run)
    assert w_ref.keys() == w_got.keys()
    scale = max(float(w.abs().max()) for w in w_ref.values())
    twin_dev = max(float((w_ref[k] - w_twin[k]).abs().max()) for k in w_ref) / scale
    got_dev = max(float((w_ref[k] - w_got[k]).abs().max()) for k in w_ref) / scale
    assert got_dev <= NOISE_FACTOR * max(twin_dev, U), (got_dev, twin_dev)
    assert any(float(w.abs().max()) > 0 for k, w in w_got.items() if "lora_B" in k)  # it trained at all


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """One process, each global batch of 16 as four micro-batches of 4: each rank's share of the two
    micro-batches of 8 a 2-process launch makes (so every micro-batch has the same pairs and shapes in both),
    and its twin with two micro-batches of 8 (see the bounds above). Both share one cache."""
    root = tmp_path_factory.mktemp("single")
    for name, accum in (("run", 4), ("twin", 2)):
        _run([sys.executable, "run.py", *TOY, f"trainer.grad_accum={accum}", f"cache_dir={root / 'cache'}",
              f"hydra.run.dir={root / name}"], ENV)
    return root


# Engines (conf/accelerate/<engine>_2cpu.yaml). ZeRO-3 runs with `pytest -m slow` (the default suite keeps to
# 7 minutes on 2 cores): it takes ZeRO-2's engine calls and FSDP's train-a-copy path, both checked by default,
# and gathers from DeepSpeed's partitions.
ENGINES = ("ddp", "fsdp", "zero2", "zero3")


@pytest.mark.parametrize("engine", [pytest.param(e, marks=pytest.mark.slow) if e == "zero3" else e for e in ENGINES])
def test_two_processes_train_like_one(engine, single_process, tmp_path):
    one = single_process / "cache"
    two = tmp_path / "cache2"
    # The 2-process run reuses π_ref, its samples and scores (read by both ranks from rank 0's cache) but
    # must train its own adapter and recompute the reference log-probabilities (rank 0 computes, rank 1 waits).
    shutil.copytree(one, two, ignore=shutil.ignore_patterns("adapter", "ref_logprob", "checkpoints", "jobs"))
    # Two micro-batches per global batch, so that where the ranks reduce (the accumulation boundary) matters.
    _accelerate(f"{engine}_2cpu", *TOY, "trainer.grad_accum=2", f"cache_dir={two}",
                f"hydra.run.dir={tmp_path / 'run2'}")

    s1 = json.loads((single_process / "run" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "run2" / "summary.json").read_text())
    info = json.loads((tmp_path / "run2" / "run_info.json").read_text())
    assert info["distributed"] == {"world_size": 2, "rank": 0}
    assert s2["train/steps"] == s1["train/steps"] == 8  # 120 pairs in global batches of 16
    assert s2["dual/lambda"] == s1["dual/lambda"]  # the same cached samples and scores
    # The adapter compared is saved from the policy after training: under FSDP and ZeRO-3, which train a copy,
    # it holds the weights gathered back from the shards.
    _assert_trains_like_one_process(single_process / "run", single_process / "twin", tmp_path / "run2")
    # Only rank 0 published: one adapter entry, no rank scratch directories left in the cache.
    assert len(list((two / "adapter").glob("*/*/manifest.json"))) == 1
    assert not list(two.rglob(".rank*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache2", "run2"]
    assert s2["eval/safety_gain"] == pytest.approx(s1["eval/safety_gain"], abs=0.05)
    torch.testing.assert_close(torch.tensor(s2["predicted/safety_gain"]), torch.tensor(s1["predicted/safety_gain"]))


@pytest.mark.fast
def test_engine_is_read_from_the_launch():
    assert engine_from_env({}) == "ddp"
    assert engine_from_env({"ACCELERATE_USE_FSDP": "true"}) == "fsdp"
    assert engine_from_env({"ACCELERATE_USE_DEEPSPEED": "True"}) == "deepspeed"


def test_mixed_precision_from_the_accelerate_config_is_refused():
    code = ("import torch; from alignment import engines; "
            "engines.start(torch.nn.Linear(2, 2), lr=0.1, weight_decay=0.0, max_grad_norm=1.0, micro_batch=1, "
            "grad_accum=1)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**ENV, "ACCELERATE_MIXED_PRECISION": "bf16"})
    assert done.returncode != 0
    assert "mixed_precision 'bf16'; set it to 'no'" in done.stderr


def test_safe_rlhf_shares_each_steps_rollouts_between_processes(single_process, tmp_path):
    """The online baseline under 2 processes: each rank samples, scores and differentiates half of every step's
    prompts; the multiplier moves on the global batch's slack, and the compute counts are the whole job's."""
    two = tmp_path / "cache2"
    shutil.copytree(single_process / "cache", two, ignore=shutil.ignore_patterns("adapter", "checkpoints", "jobs"))
    steps, prompts, k = 4, 6, 4
    online = ["algorithm=safe_rlhf", "safety.margin=0.3", f"algorithm.safe_rlhf.steps={steps}",
              f"algorithm.safe_rlhf.prompts_per_step={prompts}", f"algorithm.safe_rlhf.samples_per_prompt={k}"]
    _accelerate("ddp_2cpu", *TOY, *online, f"cache_dir={two}", f"hydra.run.dir={tmp_path / 'run2'}")
    s1 = json.loads((single_process / "run" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "run2" / "summary.json").read_text())
    history = s2["safe_rlhf/history"]
    assert len(history) == steps and history[0]["lambda"] == [1.0]
    assert len({h["lambda"][0] for h in history}) == steps  # the multiplier moved every step
    # π_ref's samples (as in the mocan run) plus every rollout of both ranks: steps x prompts x k.
    assert s2["compute/policy_samples"] == s1["compute/policy_samples"] + steps * prompts * k
    assert s2["compute/scorer_calls"] == s1["compute/scorer_calls"] + steps * prompts * k
    assert s2["compute/training_runs"] == 1


def test_slurm_job_tasks_train_as_ranks(single_process, tmp_path):
    """The Slurm preset with tasks_per_node=2 (hydra-submitit-launcher, run locally): the job's two tasks
    become the ranks of one launch (submitit's torch environment) and train like one process; a relaunch
    skips the completed job on both ranks."""
    cache = tmp_path / "cache"
    shutil.copytree(single_process / "cache", cache,
                    ignore=shutil.ignore_patterns("adapter", "ref_logprob", "checkpoints", "jobs", "eval_samples"))
    args = [sys.executable, str(ROOT / "run.py"), "-m", *TOY, "trainer.grad_accum=2", f"cache_dir={cache}",
            "hydra/launcher=submitit_local",
            "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10"]
    _run([*args, f"hydra.sweep.dir={tmp_path / 'first'}"], ENV)
    job = tmp_path / "first" / "0"
    info = json.loads((job / "run_info.json").read_text())
    assert info["distributed"] == {"world_size": 2, "rank": 0}
    _assert_trains_like_one_process(single_process / "run", single_process / "twin", job)
    assert len(list((cache / "jobs").glob("*.json"))) == 1  # rank 0 alone keeps the registry
    _run([*args, f"hydra.sweep.dir={tmp_path / 'again'}"], ENV)
    again = json.loads((tmp_path / "again" / "0" / "summary.json").read_text())
    assert again["resumed_from"] == str(job.resolve())
