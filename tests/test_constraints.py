"""requirements/constraints.txt is the tested environment, and make installs with it."""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, requires, version

import pytest
from conftest import REPO

CONSTRAINTS = REPO / "requirements" / "constraints.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    lines = [line for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    bad = [line for line in lines if not PIN.match(line)]
    assert not bad, f"{CONSTRAINTS}: lines that are no plain name==version pin: {bad}"
    return {_canonical(PIN.match(line)[1]): PIN.match(line)[2] for line in lines}


def _requirement_names() -> set[str]:
    """The project's requirements and those of every extra, as its installed metadata lists them."""
    return {_canonical(re.match(r"[A-Za-z0-9._-]+", requirement)[0]) for requirement in requires("wbc-pipeline")}


def test_every_requirement_and_extra_is_pinned_and_torch_fits_cpu_and_cuda_builds():
    pins = _pins()
    assert not _requirement_names() - set(pins), "pyproject requirements without a pin (run make lock)"
    assert "+" not in pins["torch"], "torch pinned to one build; a version without a local label fits CPU and CUDA"
    assert not [name for name in pins if name.startswith("nvidia-") or name == "triton"]


def test_the_pins_are_the_versions_installed_here():
    stale = {}
    for name, pinned in _pins().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "not installed"
        if installed.split("+")[0] != pinned:
            stale[name] = (pinned, installed)
    assert not stale, f"constraints.txt differs from this environment (pinned, installed): {stale}; run make lock"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_installs_every_package_with_the_constraints():
    plan = subprocess.run(["make", "-n", "-W", "pyproject.toml", "setup"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout
    installs = [line for line in plan.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert len(installs) == 2, plan  # torch first, then the package with its extras
    assert all(f"-c {CONSTRAINTS.relative_to(REPO)}" in line for line in installs), plan
    assert "[dev,lite0,team]" in installs[1]
