"""The one stage-2 training loop: pairs in, a trained policy out.

Algorithms differ only in which pairs and labels they pass in (MoCAN: labels from r + λ*ᵀg; later PeCAN,
fixed λ, DPO on one objective) and in how a policy computes log-ratios for a batch, which is injected as
``logratios``. The loop itself is set up, train (AdamW, accumulation, clipping, schedule), return.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from alignment.config import TrainerConfig
from alignment.losses import preference_metrics, pseudo_preference_loss

# (policy, batch) -> (ρ(y1), ρ(y0)), each [B], with ρ = log π_θ - log π_ref.
LogRatios = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    pairs_seen: int = 0


def _schedule(cfg: TrainerConfig, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.scheduler == "cosine":
            progress = (step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


def train_pairs(
    policy: nn.Module,
    pairs: dict[str, torch.Tensor],
    logratios: LogRatios,
    *,
    beta: float,
    cfg: TrainerConfig,
    seed: int,
    log: Callable[[dict[str, Any], int], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Minimise the pseudo-preference loss over ``pairs`` (tensors sharing a first dimension P, with "label").

    ``cfg.batch_size`` is the global number of pairs per optimiser step, split into ``cfg.grad_accum``
    micro-batches. Shuffling uses its own generator seeded by ``seed``: the same config and seed give the same
    trained policy.
    """
    n_pairs = int(pairs["label"].shape[0])
    if n_pairs == 0:
        raise ValueError("train_pairs: no pairs to train on")
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(n_pairs / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, total))
    generator = torch.Generator().manual_seed(seed)
    micro = max(cfg.batch_size // cfg.grad_accum, 1)
    history: list[dict[str, float]] = []
    step, loss_value = 0, float("nan")
    policy.train()
    # disable=None: bars on a terminal, silent in logs and CI.
    bar = tqdm(total=total, desc="stage 2", disable=None if progress else True, leave=False)
    for _ in range(cfg.epochs):
        order = torch.randperm(n_pairs, generator=generator)
        for start in range(0, n_pairs, cfg.batch_size):
            batch_idx = order[start:start + cfg.batch_size]
            optimizer.zero_grad(set_to_none=True)
            totals = {"loss": 0.0, "reward_margin": 0.0, "label_accuracy": 0.0}
            for m_start in range(0, len(batch_idx), micro):
                idx = batch_idx[m_start:m_start + micro]
                batch = {k: v[idx] for k, v in pairs.items()}
                rho_1, rho_0 = logratios(policy, batch)
                losses = pseudo_preference_loss(rho_1, rho_0, batch["label"], beta)
                # Sum over micro-batches of (sum / batch) = mean over the global batch, whatever the split.
                (losses.sum() / len(batch_idx)).backward()
                weight = len(idx) / len(batch_idx)
                totals["loss"] += float(losses.detach().mean()) * weight
                for key, value in preference_metrics(rho_1.detach(), rho_0.detach(), batch["label"], beta).items():
                    totals[key] += value * weight
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            optimizer.step()
            scheduler.step()
            step += 1
            loss_value = totals["loss"]
            if step % cfg.log_every == 0 or step == total:
                row = {f"train/{k}": v for k, v in totals.items()}
                row.update({"train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0]})
                history.append({"step": step, **row})
                if log is not None:
                    log(row, step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
    bar.close()
    policy.eval()
    return TrainResult(steps=step, final_loss=loss_value, history=history, pairs_seen=step * cfg.batch_size)
