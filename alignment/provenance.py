"""What a run needs to be reproduced: git commit, package versions, platform, seeds."""

from __future__ import annotations

import platform
import random
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

PACKAGES = ("torch", "numpy", "scipy", "transformers", "peft", "accelerate", "hydra-core", "omegaconf",
            "wandb", "lm-eval", "datasets", "trl")


def git_state(repo: str | Path | None = None) -> dict[str, Any]:
    """Commit of the code that ran, and whether the working tree had uncommitted changes."""
    root = Path(repo) if repo else Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_info(seed: int) -> dict[str, Any]:
    return {
        "git": git_state(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "seed": seed,
        "command": sys.argv,
    }


def seed_everything(seed: int) -> None:
    """Global seeds for libraries that draw from global state; our own code passes explicit generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
