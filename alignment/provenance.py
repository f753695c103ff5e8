"""What a run needs to be reproduced: git commit, the lock and whether the installed packages match it,
package versions, platform, seeds."""

from __future__ import annotations

import hashlib
import logging
import platform
import random
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

logger = logging.getLogger(__name__)

# The environment every run is tested in (`make lock` writes it, `make run` / `make test` install it).
LOCK_FILE = Path(__file__).resolve().parent.parent / "requirements.lock"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")

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


def read_lock(path: str | Path) -> dict[str, str]:
    """The exact pins of a pip-compile lock: canonical package name -> version (comments and options skipped)."""
    pins: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        match = _PIN.match(line.strip())
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def lock_differences(pins: dict[str, str], installed: dict[str, str | None]) -> dict[str, dict[str, str | None]]:
    """Locked packages whose installed version is not the locked one (None: not installed).

    Versions compare as PEP 440 ``==`` does: a build label the lock does not name is ignored, so a lock pin
    ``torch==2.13.0`` is met by ``2.13.0+cpu`` and by ``2.13.0+cu128``.
    """
    differing: dict[str, dict[str, str | None]] = {}
    for name, locked in sorted(pins.items()):
        version = installed.get(name)
        try:
            ok = version is not None and Version(version) in SpecifierSet(f"=={locked}")
        except InvalidVersion:
            ok = version == locked
        if not ok:
            differing[name] = {"locked": locked, "installed": version}
    return differing


def installed_versions() -> dict[str, str]:
    """Every installed distribution: canonical name -> version."""
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()
            if d.metadata["Name"]}


def lock_state(path: str | Path | None = None) -> dict[str, Any]:
    """The lock's hash and whether this process's packages are the locked ones.

    ``packages_match_lock`` is None when there is no lock (a non-editable install of the package);
    ``packages_differing_from_lock`` names each differing package with its locked and installed version.
    """
    path = Path(LOCK_FILE if path is None else path)
    if not path.is_file():
        return {"lock": None, "packages_match_lock": None, "packages_differing_from_lock": {}}
    differing = lock_differences(read_lock(path), installed_versions())
    return {"lock": {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()},
            "packages_match_lock": not differing, "packages_differing_from_lock": differing}


def run_info(seed: int) -> dict[str, Any]:
    lock = lock_state()
    if lock["packages_match_lock"] is False:
        shown = ", ".join(f"{name} {v['installed']} (locked {v['locked']})"
                          for name, v in list(lock["packages_differing_from_lock"].items())[:8])
        more = len(lock["packages_differing_from_lock"]) - 8
        logger.warning("installed packages differ from %s: %s%s. Numbers may differ from a locked install; "
                       "`make clean-venv run` (or `pip install -r requirements.lock`) restores it",
                       lock["lock"]["file"], shown, f" and {more} more" if more > 0 else "")
    return {
        "git": git_state(),
        **lock,
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
