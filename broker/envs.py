"""Create each daemon's virtual environment: the work behind `modelhost setup [NAME...]`.

A venv gets modelhost as an *editable* install of the source tree (so a
daemon always runs the code of the checkout the broker runs), then the
daemon's own requirements file. What it was built from is remembered in
`<venv>/modelhost-setup.json`; when nothing changed, setup does nothing.

Editable installs on old interpreters (checked on 3.7.16 and 3.8.18): both
installers build modelhost through PEP 660 in an isolated build environment,
with the newest setuptools that still supports that Python (68.0 on 3.7),
which handles our package-dir mapping. uv needs nothing special; pip needs
pip >= 21.3, and the pip that `python3.7 -m venv` bundles is 22.0.4, so no
pip upgrade is needed (and none is done: it would cost a round trip per setup).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .config import DaemonConfig
from .config_model import PYTHON_VERSION

__all__ = ["SetupResult", "project_root", "setup_daemon", "setup_all", "FINGERPRINT_FILE",
           "interpreter_for", "find_base_interpreter"]

# Bump when what a setup installs changes in a way the fingerprint cannot see,
# so that every venv is rebuilt once.
SCHEMA_VERSION = 1
FINGERPRINT_FILE = "modelhost-setup.json"
_TAIL_LINES = 20
# Prints the version and the installation a venv stems from; json because
# sys.version holds a newline on some builds (3.7: "... \n[GCC 12.2.0]").
_PROBE = "import sys, json; print(json.dumps([sys.version, sys.base_prefix]))"


@dataclass
class SetupResult:
    name: str
    action: str  # "created" | "updated" | "unchanged" | "skipped" | "failed"
    message: str
    seconds: float
    # What the engine says keeps it from loading here (its preflight(): weights
    # not downloaded, an extension not built): setup succeeded, the daemon
    # will not start until these are dealt with.
    cannot: list = field(default_factory=list)


class _SetupFailed(Exception):
    pass


def project_root() -> Path | None:
    """The modelhost source tree (holding pyproject.toml and client/), or None when
    modelhost was installed from a wheel and the tree is not around."""
    import modelhost

    root = Path(modelhost.__file__).resolve().parent.parent  # client/__init__.py -> root
    if (root / "pyproject.toml").is_file() and (root / "client" / "__init__.py").is_file():
        return root
    return None


def setup_all(daemons: Iterable[DaemonConfig] | Mapping[str, DaemonConfig], **kw) -> list[SetupResult]:
    """setup_daemon for each daemon in turn; one failure does not stop the others."""
    if isinstance(daemons, Mapping):
        daemons = daemons.values()
    return [setup_daemon(d, **kw) for d in daemons]


def setup_daemon(daemon: DaemonConfig, *, force: bool = False,
                 log: Callable[[str], None] = print, installer: str | None = None) -> SetupResult:
    """Create or update the daemon's venv. `log` gets progress lines (installer
    output included); the returned result says what happened. Never raises for
    a problem of the environment: those come back as action "failed".

    installer: "uv" or "pip" (anything else means pip); None picks uv when it is on PATH and
    MODELHOST_NO_UV is not set.
    """
    start = time.monotonic()

    def result(action: str, message: str) -> SetupResult:
        return SetupResult(daemon.name, action, message, round(time.monotonic() - start, 3))

    try:
        base = find_base_interpreter(daemon.python)
        if daemon.venv is None:
            return result("skipped", f"{daemon.name}: runs {base} directly (venv: false); "
                                     "nothing to set up")
        root = project_root()
        if root is None:
            return result("failed", (
                f"{daemon.name}: setup needs the modelhost source tree, but modelhost is "
                "installed without it (from a wheel). Daemon venvs get modelhost as an "
                "editable install of that tree, so that daemons run the same code as the "
                "broker: clone the repository and `pip install -e <checkout>[host]`, then "
                "run setup again."))
        done = _setup(daemon, base, root, force, log, installer or _pick_installer(), result)
        done.cannot = preflight(daemon)
        return done
    except (_SetupFailed, FileNotFoundError, ValueError) as e:
        return result("failed", f"{daemon.name}: {e}")
    except OSError as e:  # permissions, a full disk: the environment, not a bug
        return result("failed", f"{daemon.name}: {e}")


def _setup(daemon, base: Path, root: Path, force, log, installer, result) -> SetupResult:
    name, venv = daemon.name, daemon.venv
    base_probe = _probe(base)
    if base_probe is None:
        raise _SetupFailed(f"the interpreter {base} does not run")
    version = base_probe[0].split()[0]
    fingerprint = {
        "schema": SCHEMA_VERSION,
        "python": str(base),
        "python_version": base_probe[0],
        "requirements_sha256": _sha256(daemon.requirements) if daemon.requirements else None,
        "modelhost_root": str(root),
        "pyproject_sha256": _sha256(root / "pyproject.toml"),
    }
    venv_python = venv / "bin" / "python"
    stamp = venv / FINGERPRINT_FILE

    if not force and _read_json(stamp) == fingerprint and _runs(venv_python, "import modelhost.daemons.runtime"):
        return result("unchanged", f"{name}: up to date ({version}, {venv})")

    if venv.exists():
        if not (venv / "pyvenv.cfg").is_file() and any(venv.iterdir()):
            # Never delete a directory that venv did not make: a typo in `venv:` must not cost data.
            raise _SetupFailed(f"{venv} exists and is not a virtual environment; "
                               "move it away or point `venv:` elsewhere")
        # A venv of another interpreter (or a broken one) cannot be upgraded in place.
        if force or _probe(venv_python) != base_probe:
            log(f"{name}: removing {venv} (" + ("--force" if force else "made with another "
                "python, or broken") + ")")
            shutil.rmtree(venv)
    created = not venv_python.exists()
    stamp.unlink(missing_ok=True)  # a failed install must be retried, even if the change is undone

    if created:
        log(f"{name}: creating {venv} with {base} ({version}) using {installer}")
        if installer == "uv":
            _run(name, [_uv() or "uv", "venv", "--no-project", "--python", str(base), str(venv)], log)
        else:
            _run(name, [str(base), "-m", "venv", str(venv)], log)

    # No --upgrade: a second run keeps what is installed and only adds what changed.
    # Lines removed from the requirements stay installed until `setup --force`.
    packages = ["-e", str(root)]
    if daemon.requirements:
        packages += ["-r", str(daemon.requirements)]
    log(f"{name}: installing modelhost (editable, from {root})"
        + (f" and {daemon.requirements}" if daemon.requirements else ""))
    if installer == "uv":
        # uv does not read pip.conf (extra indexes): set UV_INDEX / UV_EXTRA_INDEX_URL,
        # or MODELHOST_NO_UV=1 to go through pip, when a daemon needs a private index.
        _run(name, [_uv() or "uv", "pip", "install", "--python", str(venv_python), *packages], log)
    else:
        if not _runs(venv_python, "import pip"):
            # Made by uv (which seeds no pip), and uv is not here now: another
            # checkout's host venv, another PATH. The interpreter's own wheel of
            # pip (ensurepip, offline, 3.7 too) makes it updatable again.
            log(f"{name}: {venv} has no pip (made by uv?); installing it with ensurepip")
            _run(name, [str(venv_python), "-m", "ensurepip"], log)
        _run(name, [str(venv_python), "-m", "pip", "install", *packages], log)
    if not _runs(venv_python, "import modelhost.daemons.runtime"):
        raise _SetupFailed(f"installed, but {venv_python} cannot import "
                           "modelhost.daemons.runtime")

    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(json.dumps(fingerprint, indent=2) + "\n")
    tmp.replace(stamp)
    action = "created" if created else "updated"
    return result(action, f"{name}: {action} {venv} ({version}, {installer})")


def preflight(daemon: DaemonConfig) -> list[str]:
    """The engine's own list of what it lacks here, asked in the daemon's venv."""
    command = [str(interpreter_for(daemon)), "-m", "modelhost.daemons.preflight", daemon.engine,
               json.dumps(daemon.options), *[str(p) for p in daemon.pythonpath]]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=120,
                             env=_clean_env())
        problems = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 \
            else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        problems = None
    if problems is None:
        return ["could not ask the engine what it needs (`{}` failed)".format(
            " ".join(command[:4]))]
    return problems


def _pick_installer() -> str:
    if os.environ.get("MODELHOST_NO_UV"):
        return "pip"
    return "uv" if _uv() else "pip"


def _uv() -> str | None:
    # Also beside our interpreter: `pip install uv` into a broker venv that is not activated.
    return shutil.which("uv") or shutil.which("uv", path=os.path.dirname(sys.executable))


def _clean_env() -> dict[str, str]:
    # The broker's own environment must not leak into another interpreter:
    # PYTHONPATH could make an incomplete venv look complete, PYTHONHOME breaks it.
    env = dict(os.environ)
    for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
        env.pop(var, None)
    return env


def _run(name: str, cmd: list[str], log) -> None:
    """Run an installer command, streaming its output; _SetupFailed with its tail on failure."""
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, errors="replace",
                                env=_clean_env())
    except OSError as e:
        raise _SetupFailed(f"cannot run `{shlex.join(cmd)}`: {e}") from None
    with proc:
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            log(f"{name}: {line}")
    if proc.returncode != 0:
        raise _SetupFailed(f"setup failed: `{shlex.join(cmd)}` exited with status "
                           f"{proc.returncode}; its last output:\n" + "\n".join(tail))


def _probe(python: Path) -> tuple[str, str] | None:
    try:
        out = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True,
                             timeout=60, env=_clean_env())
        return tuple(json.loads(out.stdout)) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def _runs(python: Path, code: str) -> bool:
    try:
        return subprocess.run([str(python), "-c", code], capture_output=True, timeout=120,
                              env=_clean_env()).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        raise _SetupFailed(f"requirements file {path} not found") from None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- interpreters ---------------------------------------------------------------------

def interpreter_for(daemon: DaemonConfig) -> Path:
    """The Python executable the daemon runs with."""
    if daemon.venv is not None:
        return daemon.venv / "bin" / "python"
    return find_base_interpreter(daemon.python)


def find_base_interpreter(spec: str) -> Path:
    """Resolve "3.12", "3.8.18" or an interpreter path to an existing executable.

    A version is looked for in pyenv first ($PYENV_ROOT/versions, newest
    matching patch release), then as `pythonX.Y` on PATH.
    """
    if "/" in spec:
        exe = Path(os.path.expanduser(os.path.expandvars(spec)))
        if exe.is_file() and os.access(exe, os.X_OK):
            return exe
        raise FileNotFoundError(f"python interpreter {spec!r}: {exe} is not an executable file")

    m = PYTHON_VERSION.match(spec)
    if not m:
        raise ValueError(f"python {spec!r}: expected a version like '3.12' or '3.8.18', or a path")
    major, minor, patch = m.group(1), m.group(2), m.group(3)
    short = f"{major}.{minor}"
    tried = []

    versions = Path(os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")) / "versions"
    candidates = []
    if versions.is_dir():
        for entry in versions.iterdir():
            # Only plain X.Y.Z releases: skip "3.13.0t" (free-threaded), "3.12-dev", rcs.
            em = re.fullmatch(rf"{major}\.{minor}\.(\d+)", entry.name)
            if em and (patch is None or int(em.group(1)) == int(patch)):
                candidates.append((int(em.group(1)), entry))
    for _, entry in sorted(candidates, reverse=True):
        exe = entry / "bin" / f"python{short}"
        tried.append(str(exe))
        if exe.is_file() and os.access(exe, os.X_OK):
            return exe
    if not candidates:
        tried.append(f"{versions}/{spec if patch else short + '.*'}")

    name = f"python{short}"
    found = shutil.which(name)
    tried.append(f"{name} on PATH")
    if found:
        # PATH gives some X.Y; an exact X.Y.Z request must get exactly that release.
        if patch is None or _version_of(found) == spec:
            return Path(found)
        tried[-1] += f" (found {found}, but it is not {spec})"
    raise FileNotFoundError(f"no python {spec} found; tried: " + "; ".join(tried))


def _version_of(exe: str) -> str | None:
    try:
        out = subprocess.run(
            [exe, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
            capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
