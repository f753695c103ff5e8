"""The locked environment: requirements.lock pins every dependency pyproject.toml names, the installed
packages are the locked ones, and a run records the lock and says when its packages differ from it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from alignment import provenance

pytestmark = pytest.mark.fast
ROOT = Path(__file__).resolve().parents[1]


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    lines = [*project["dependencies"], *extras["test"], *extras["launchers"]]
    lines += [line.split("#")[0].strip() for line in (ROOT / "requirements.in").read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


def test_the_lock_pins_every_declared_dependency_within_its_range():
    pins = provenance.read_lock(ROOT / "requirements.lock")
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared but not in requirements.lock: run `make lock` and commit it"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
    # torch carries no build label, so a CUDA build of the same release meets the lock too.
    assert "+" not in pins["torch"]


def test_the_installed_packages_are_the_locked_ones():
    state = provenance.lock_state()
    assert state["lock"]["sha256"] and len(state["lock"]["sha256"]) == 64
    assert state["packages_match_lock"], (
        f"installed packages differ from requirements.lock: {state['packages_differing_from_lock']}; "
        "reinstall with `make clean-venv test`")


def test_versions_compare_as_pep440_equality():
    pins = {"torch": "2.13.0", "numpy": "2.4.6", "gone": "1.0"}
    installed = {"torch": "2.13.0+cpu", "numpy": "2.4.5"}
    assert provenance.lock_differences(pins, installed) == {
        "numpy": {"locked": "2.4.6", "installed": "2.4.5"}, "gone": {"locked": "1.0", "installed": None}}
    assert provenance.lock_differences({"torch": "2.13.0+cpu"}, {"torch": "2.13.0+cu128"})  # a named label counts


def test_a_run_records_the_lock_and_names_packages_that_differ(tmp_path, monkeypatch, caplog):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# a comment\nnumpy==0.0.1\n    # via x\ntorch==" + provenance.installed_versions()["torch"]
                    + "\nnot-installed-anywhere==1.2\n")
    monkeypatch.setattr(provenance, "LOCK_FILE", lock)
    with caplog.at_level(logging.WARNING, logger="alignment.provenance"):
        info = provenance.run_info(seed=3)
    assert info["packages_match_lock"] is False
    assert sorted(info["packages_differing_from_lock"]) == ["not-installed-anywhere", "numpy"]
    assert info["packages_differing_from_lock"]["numpy"]["locked"] == "0.0.1"
    assert "numpy" in caplog.text and "requirements.lock" in caplog.text
    json.dumps(info)  # written as run_info.json
    monkeypatch.setattr(provenance, "LOCK_FILE", tmp_path / "absent.lock")
    assert provenance.run_info(seed=3)["packages_match_lock"] is None
