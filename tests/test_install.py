"""The installed packages are the tested set in ``constraints.txt``, so that CI notices drift.

A fresh install resolves the newest releases that ``pyproject.toml`` allows; the README and
``.ci/run`` install with ``-c constraints.txt`` to get the set that passed. When this test fails,
the environment was installed some other way: reinstall with the constraints, or refresh them
(``bash .ci/refresh-constraints``, which sets ``LDM_SKIP_CONSTRAINTS_CHECK`` while it tests the
newest versions).
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def pinned() -> dict[str, str]:
    """name -> version of every ``name==version`` line of constraints.txt."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt: {line!r} is not an exact pin"
            pins[req.name] = spec.version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_constraints_pin_every_dependency_of_the_project():
    pins = {canonical(n) for n in pinned()}
    requires = metadata.requires("ldm") or []
    direct = {canonical(Requirement(r).name) for r in requires if "extra ==" not in r}
    dev = {canonical(Requirement(r).name) for r in requires if 'extra == "dev"' in r}
    assert direct | dev <= pins, f"not pinned in constraints.txt: {sorted((direct | dev) - pins)}"


@pytest.mark.skipif(bool(os.environ.get("LDM_SKIP_CONSTRAINTS_CHECK")), reason="refreshing the constraints")
def test_installed_versions_are_the_tested_set():
    drift = []
    for name, version in pinned().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # pinned for a platform or an extra that this environment does not use
        if installed != version:
            drift.append(f"{name} {installed} (tested: {version})")
    assert not drift, (
        "installed versions differ from constraints.txt: "
        + ", ".join(drift)
        + '; install with pip install -c constraints.txt -e ".[dev]", or refresh with bash .ci/refresh-constraints'
    )


def test_pyproject_bounds_admit_the_tested_set():
    pins = {canonical(n): v for n, v in pinned().items()}
    for r in metadata.requires("ldm") or []:
        req = Requirement(r)
        version = pins.get(canonical(req.name))
        if version is not None and "extra ==" not in r:
            assert req.specifier.contains(version, prereleases=True), (
                f"pyproject.toml's {r} excludes {version}"
            )
