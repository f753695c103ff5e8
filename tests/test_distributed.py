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
TOY = ["experiment=toy", "dataset.n_prompts=40", "model.sft_steps=20", "sampling.num_samples=4",
       "algorithm.pairs_per_prompt=4", "trainer.batch_size=16", "trainer.epochs=1", "trainer.log_every=1",
       "trainer.warmup_steps=0", "eval.num_samples=1", "eval.bootstrap=50", "tracker=none", "model.device=cpu"]


def test_shards_cover_every_item_once():
    for n in range(0, 9):
        for world in (1, 2, 3):
            parts = [list(range(n))[Distributed(rank=r, world_size=world).shard(n)] for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


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


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


# Engines (conf/accelerate/<engine>_2cpu.yaml) and how close each must land to the single process: the largest
# loss difference over the 8 steps, and the largest adapter weight difference relative to the largest weight.
# Measured: DDP 7e-8 / 8e-8, FSDP 7e-8 / 8e-8, ZeRO-2 1e-6 / 1.4e-6, ZeRO-3 9e-7 / 7e-5. ZeRO partitions
# and flattens gradients before reducing them, another float summation order, and Adam's first steps turn
# the ~1e-7 differences of near-zero gradient coordinates into lr-sized moves (see the single-process run).
ENGINES = {"ddp": (1e-6, 1e-5), "fsdp": (1e-6, 1e-5), "zero2": (1e-5, 1e-4), "zero3": (1e-5, 1e-3)}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """One process, each global batch of 16 as two micro-batches of 8: the same arithmetic as two ranks of 8
    whose gradients are averaged. (With one micro-batch of 16 the float sums are ordered differently, and Adam's
    first step turns gradient noise of ~1e-7 into lr-sized moves of near-zero coordinates, so the runs drift
    apart by ~1e-2 in loss within 8 steps: noise, not a bug, and not what these tests are about.)"""
    root = tmp_path_factory.mktemp("single")
    _run([sys.executable, "run.py", *TOY, "trainer.grad_accum=2", f"cache_dir={root / 'cache'}",
          f"hydra.run.dir={root / 'run'}"], ENV)
    return root



# ZeRO-3 runs with `pytest -m slow` (the default suite keeps to 10 minutes on 2 cores): it takes ZeRO-2's
# engine calls and FSDP's train-a-copy path, both checked by default, and gathers from DeepSpeed's partitions.
@pytest.mark.parametrize("engine", [pytest.param(e, marks=pytest.mark.slow) if e == "zero3" else e for e in ENGINES])
def test_two_processes_train_like_one(engine, single_process, tmp_path):
    one = single_process / "cache"
    two = tmp_path / "cache2"
    # The 2-process run reuses π_ref, its samples and scores (read by both ranks from rank 0's cache) but
    # must train its own adapter and recompute the reference log-probabilities (rank 0 computes, rank 1 waits).
    shutil.copytree(one, two, ignore=shutil.ignore_patterns("adapter", "ref_logprob", "checkpoints", "jobs"))
    _accelerate(f"{engine}_2cpu", *TOY, f"cache_dir={two}", f"hydra.run.dir={tmp_path / 'run2'}")

    s1 = json.loads((single_process / "run" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "run2" / "summary.json").read_text())
    info = json.loads((tmp_path / "run2" / "run_info.json").read_text())
    assert info["distributed"] == {"world_size": 2, "rank": 0}
    assert s2["train/steps"] == s1["train/steps"] == 8  # 120 pairs in global batches of 16
    assert s2["dual/lambda"] == s1["dual/lambda"]  # the same cached samples and scores
    loss_tol, weight_tol = ENGINES[engine]
    l1, l2 = _losses(single_process / "run"), _losses(tmp_path / "run2")
    assert len(l1) == len(l2) == 8
    assert max(abs(a - b) for a, b in zip(l1, l2)) < loss_tol, (l1, l2)
    w1 = load_file(str(Path(s1["train/adapter"]) / "adapter_model.safetensors"))
    w2 = load_file(str(Path(s2["train/adapter"]) / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys()
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    scale = max(float(w1[k].abs().max()) for k in w1)
    assert diff <= weight_tol * scale, (diff, scale)
    assert any(float(w1[k].abs().max()) > 0 for k in w1 if "lora_B" in k)  # it trained at all
    # Only rank 0 published: one adapter entry, no rank scratch directories left in the cache.
    assert len(list((two / "adapter").glob("*/*/manifest.json"))) == 1
    assert not list(two.rglob(".rank*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache2", "run2"]
    # The adapter compared above is saved from the policy after training: under FSDP and ZeRO-3, which train a
    # copy, it holds the weights gathered back from the shards.
    assert s2["eval/safety_gain"] == pytest.approx(s1["eval/safety_gain"], abs=0.05)
    torch.testing.assert_close(torch.tensor(s2["predicted/safety_gain"]), torch.tensor(s1["predicted/safety_gain"]))


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
    args = [sys.executable, str(ROOT / "run.py"), "-m", *TOY, f"cache_dir={cache}", "hydra/launcher=submitit_local",
            "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10"]
    _run([*args, f"hydra.sweep.dir={tmp_path / 'first'}"], ENV)
    job = tmp_path / "first" / "0"
    info = json.loads((job / "run_info.json").read_text())
    assert info["distributed"] == {"world_size": 2, "rank": 0}
    l1, l2 = _losses(single_process / "run"), _losses(job)
    assert len(l2) == 8 and max(abs(a - b) for a, b in zip(l1, l2)) < ENGINES["ddp"][0]
    assert len(list((cache / "jobs").glob("*.json"))) == 1  # rank 0 alone keeps the registry
    _run([*args, f"hydra.sweep.dir={tmp_path / 'again'}"], ENV)
    again = json.loads((tmp_path / "again" / "0" / "summary.json").read_text())
    assert again["resumed_from"] == str(job.resolve())
