"""The README's commands as the Makefile runs them: JupyterLab as root, and the offline classroom
install of notebooks/TEACHING.md (a wheelhouse built once, then installed with no index at all)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def make(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, **env})


def test_lab_allows_root_only_when_run_as_root():
    dry_run = make("-n", "-o", "install", "lab").stdout  # -n: print the command, run nothing
    assert "jupyter lab" in dry_run
    assert ("--allow-root" in dry_run) == (os.geteuid() == 0)


def test_wheelhouse_variable_makes_every_pip_call_offline():
    dry_run = make("-n", "-B", "install", "VENV=/nonexistent-venv", "WHEELHOUSE=classroom-wheels").stdout
    pip_calls = [line for line in dry_run.splitlines() if "pip install" in line]
    assert len(pip_calls) == 3
    assert all("--no-index --find-links classroom-wheels" in line for line in pip_calls)


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    """The teacher's step, `make wheelhouse`, into a temporary folder (about 300 MB, from the package
    index this machine uses; skipped, with pip's reason, where no index can be reached)."""
    folder = tmp_path_factory.mktemp("wheelhouse")
    built = make("wheelhouse", f"WHEELHOUSE={folder}", f"PYTHON={sys.executable}")
    if built.returncode != 0:
        reason = (built.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"cannot build a wheelhouse here (no package index reachable?): {reason}")
    return folder


def offline_pip(*args: str) -> subprocess.CompletedProcess:
    """pip with this machine's configuration (extra indexes, find-links) switched off, so the wheelhouse
    is the only source, as on a classroom laptop with no network."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return subprocess.run([sys.executable, "-m", "pip", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


def test_the_wheelhouse_alone_installs_every_requirement_and_the_course(wheelhouse, tmp_path):
    report = tmp_path / "report.json"
    resolved = offline_pip("install", "--dry-run", "--ignore-installed", "--no-index", "--find-links", str(wheelhouse),
                           "--report", str(report), "-r", "requirements.txt")
    assert resolved.returncode == 0, resolved.stderr
    versions = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.loads(report.read_text())["install"]}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement:
            name, version = requirement.split("==")
            assert versions[name.lower()].split("+")[0] == version, name  # torch's wheel is 2.13.0+cpu
    # the course package itself builds from the wheelhouse too (setuptools comes from it)
    editable = offline_pip("install", "--dry-run", "--no-index", "--find-links", str(wheelhouse), "--no-deps", "-e", ".")
    assert editable.returncode == 0, editable.stderr
