"""The wheel installs one package, `edfed`: no top-level `common`, `client`, `server`, `cli` or `simulations` that
would collide with anything else of those names, and `import edfed` (and its parts) works from it alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERIC = {"common", "client", "server", "cli", "simulations"}


@pytest.mark.slow
def test_the_wheel_installs_only_the_edfed_package_and_imports_from_a_clean_venv(tmp_path: Path) -> None:
    # Built from a copy: setuptools writes build/ into the folder it builds.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "data", "runs", "build", "*.egg-info", "__pycache__", ".flwr", ".cache", "flwr_home"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("edfed-*.whl")
    top_level = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert top_level == {"edfed", next(n for n in top_level if n.endswith(".dist-info"))}, top_level
    assert {"edfed/client/site.py", "edfed/common/contract.py", "edfed/server/server_app.py",
            "edfed/cli/main.py", "edfed/simulations/cohort.py"} <= set(zipfile.ZipFile(wheel).namelist())

    # A clean venv that borrows the dependencies' folder (not edfed's own editable install: a folder named in a
    # .pth file is on sys.path, but its own .pth files, the editable finder among them, are not run).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_packages = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        check=True, capture_output=True, text=True).stdout.strip())
    before = set(os.listdir(site_packages))
    # A clean environment: Flower's Ray backend leaves PYTHONPATH set in the process that ran a simulation, and pip
    # would take the checkout's edfed.egg-info on it for edfed already installed.
    clean = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, cwd=tmp_path, env=clean)
    added = set(os.listdir(site_packages)) - before
    assert not added & GENERIC, added
    assert "edfed" in added
    (site_packages / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")

    probe = ("import edfed, edfed.client.model_folder, edfed.cli.main, importlib.util\n"
             "print(edfed.__file__); print(edfed.client.model_folder.__file__)\n"
             f"print([n for n in {sorted(GENERIC)} if importlib.util.find_spec(n)])\n")
    out = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env=clean).stdout.splitlines()
    assert out[0] == str(site_packages / "edfed" / "__init__.py")
    assert out[1] == str(site_packages / "edfed" / "client" / "model_folder.py")
    assert out[2] == "[]"
    version = subprocess.run([str(venv / "bin" / "edfed"), "--version"], capture_output=True, text=True, cwd=tmp_path,
                             env=clean)
    assert version.returncode == 0 and version.stdout.startswith("edfed "), version.stdout + version.stderr
