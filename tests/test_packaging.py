"""The built distribution (a wheel, installed non-editable) exposes the ``twistd mpr`` plugin.

The wheel is built from a copy of the sources (so that the build leaves nothing in the repository),
unpacked into a temporary directory, and checked by fresh interpreters started with ``-S`` so that
neither the repository (the editable install's ``.pth``) nor the current directory is on their path:
what they find comes from the built wheel and the venv's dependencies only.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

CHECK_PLUGIN = """
import sys
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
assert "mpr" in makers, sorted(makers)
plugin_module = sys.modules["twisted.plugins.mpr_plugin"]
import mpr_server, mpr_server.tap
print(makers["mpr"].module, plugin_module.__file__, mpr_server.__file__, sep="\\n")
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built and unpacked (a non-editable install without dependencies)."""
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "setup.cfg", "README.rst"):
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
    shutil.copytree(ROOT / "mpr_server", source / "mpr_server", ignore=ignore)
    shutil.copytree(ROOT / "twisted", source / "twisted", ignore=ignore)

    wheels = base / "wheels"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "-w", str(wheels), str(source)]
    if importlib.util.find_spec("wheel") is not None:
        command.insert(4, "--no-build-isolation")  # fully offline with the venv's setuptools + wheel
    else:
        command.remove("--no-index")  # build isolation fetches setuptools + wheel from the configured index
    built = subprocess.run(command, cwd=base, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = wheels.glob("mpr_server-*.whl")

    site = base / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "twisted/plugins/mpr_plugin.py" in names, names
        assert "twisted/plugins/__init__.py" not in names, "the wheel must not own the twisted.plugins package"
        assert "mpr_server/tap.py" in names, names
        archive.extractall(site)
    return site


def run_isolated(args: list[str], site: Path | None, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -S args`` with only ``site`` (if any) and the venv's site-packages on the path."""
    paths = [str(site)] if site is not None else []
    paths += dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_wheel_exposes_the_mpr_twistd_plugin(installed: Path) -> None:
    done = run_isolated(["-c", CHECK_PLUGIN], installed, installed.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    module, plugin_file, package_file = done.stdout.split()
    assert module == "mpr_server.tap"
    assert Path(plugin_file).is_relative_to(installed), plugin_file
    assert Path(package_file).is_relative_to(installed), package_file


def test_twistd_mpr_help_lists_the_options(installed: Path) -> None:
    done = run_isolated([TWISTD, "mpr", "--help"], installed, installed.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    for option in ("--ws-port", "--app-port", "--mpr-data-dir", "--message-lease-ms", "--session-grace-ms"):
        assert option in done.stdout, done.stdout


def test_without_the_wheel_there_is_no_plugin(installed: Path) -> None:
    """The control: the isolation above really hides the repository's own copy."""
    done = run_isolated(["-c", CHECK_PLUGIN], None, installed.parent)
    assert done.returncode != 0
    assert "'mpr'" not in done.stdout and "AssertionError" in done.stderr, done.stdout + done.stderr
