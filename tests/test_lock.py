"""requirements.lock is the whole environment: complete, exact, hashed, and what setup.sh installs,
whatever newer releases the registry holds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
# where the lock applies (pyproject.toml's [tool.uv] environments)
TARGET = {
    "python_version": "3.11",
    "python_full_version": "3.11.7",
    "sys_platform": "linux",
    "platform_machine": "x86_64",
}


def locked() -> dict[str, dict]:
    """name -> {"version", "hashes", "requirement"} for every entry that applies on the target."""
    entries = {}
    text = re.sub(r"\\\n\s*", " ", LOCK.read_text())
    for line in text.splitlines():
        if not line or line.startswith(("#", " ", "--")):
            continue
        spec, *hashes = line.split(" --hash=")
        requirement = Requirement(spec.strip())
        if requirement.marker is None or requirement.marker.evaluate(TARGET):
            (pin,) = requirement.specifier
            entries[canonicalize_name(requirement.name)] = {
                "version": pin.version,
                "operator": pin.operator,
                "hashes": hashes,
            }
    return entries


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = project["project"]["dependencies"] + project["project"]["optional-dependencies"]["dev"]
    return [Requirement(r) for r in listed + project["build-system"]["requires"]]


def test_every_entry_is_one_exact_version_with_hashes():
    entries = locked()
    assert len(entries) > 100  # the transitive closure, not the direct list
    for name, entry in entries.items():
        assert entry["operator"] == "==", f"{name}: {entry['operator']}{entry['version']}, not an exact pin"
        assert entry["hashes"] and all(h.startswith("sha256:") for h in entry["hashes"]), f"{name}: no hashes"
    assert {"pip", "setuptools", "torch"} <= set(entries), "the installer, the build backend and torch are locked too"


def test_the_lock_satisfies_every_range_in_pyproject():
    entries = locked()
    for requirement in project_requirements():
        name = canonicalize_name(requirement.name)
        assert name in entries, f"{requirement} is not in requirements.lock: run scripts/lock.sh"
        version = Version(entries[name]["version"])
        assert requirement.specifier.contains(version, prereleases=True), (
            f"requirements.lock pins {name}=={version}, outside pyproject.toml's {requirement}: run scripts/lock.sh"
        )


@pytest.mark.skipif(
    not (Path(sys.prefix) / ".bonsai-installed").is_file(),
    reason="runs in the environment scripts/setup.sh installs from the lock, not in a hand-made one",
)
def test_this_environment_is_the_lock():
    for name, entry in locked().items():
        assert metadata.version(name) == entry["version"], f"{name} {metadata.version(name)}, locked {entry['version']}"


def fake_wheel(folder: Path, name: str, version: str) -> Path:
    """A release of ``name`` newer than any real one; installing it would break the environment."""
    stem = f"{re.sub(r'[-_.]+', '_', name)}-{version}"
    path = folder / f"{stem}-py3-none-any.whl"
    files = {
        f"{stem}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{stem}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{stem}.dist-info/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{stem}.dist-info/RECORD"])
    with zipfile.ZipFile(path, "w") as archive:
        for file, text in files.items():
            archive.writestr(file, text)
    return path


@pytest.mark.slow
def test_setup_installs_the_lock_while_newer_releases_exist(tmp_path):
    """scripts/setup.sh into a clean venv, with a newer release of every locked package on
    pip's path: nothing newer gets in, not pip, not the build backend, not a transitive one."""
    wheelhouse = tmp_path / "newer"
    wheelhouse.mkdir()
    entries = locked()
    for name in entries:
        fake_wheel(wheelhouse, name, "9999.0")
    venv = tmp_path / "venv"
    find_links = " ".join(filter(None, [os.environ.get("PIP_FIND_LINKS", "/opt/wheels"), str(wheelhouse)]))
    env = {**os.environ, "BONSAI_VENV": str(venv), "PIP_FIND_LINKS": find_links}
    setup = subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert setup.returncode == 0, setup.stderr[-3000:]
    python = str(venv / "bin" / "python")
    # the newer releases are visible to pip there: an unpinned install would take one
    probe = subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-deps",
            "--ignore-installed",
            "--quiet",
            "--report",
            "-",
            "tqdm",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert '"version": "9999.0"' in probe.stdout, probe.stderr[-2000:]
    frozen = subprocess.run(
        [python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, check=True
    ).stdout
    installed = dict(line.split("==") for line in frozen.splitlines() if "==" in line)
    installed = {canonicalize_name(n): v for n, v in installed.items() if canonicalize_name(n) != "bonsai-prune"}
    assert installed == {name: entry["version"] for name, entry in entries.items()}
    smoke = subprocess.run(
        [python, "-c", "import torch, transformers, prefect, bonsai.flows.cli"], capture_output=True, text=True
    )
    assert smoke.returncode == 0, smoke.stderr[-2000:]
