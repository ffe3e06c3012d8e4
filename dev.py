"""Set up a local .venv and run the project's main jobs; needs nothing but Python 3.11+.

    python3 dev.py demo [ARGS]   the demo on an embedded Valkey (no Redis needed)
    python3 dev.py test [ARGS]   the whole check: tests on Valkey (and on Redis 7 when
                                 /usr/bin/redis-server exists), ruff, mypy --strict
    python3 dev.py bench [ARGS]  the whole benchmark, python -m bench (--help: its options)

The environment is created once and refreshed when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".conveyor-installed"
REDIS = "/usr/bin/redis-server"


def say(text: str) -> None:
    print(f"dev.py: {text}", flush=True)


def run(*args: str | Path, env: dict[str, str] | None = None) -> int:
    return subprocess.call([str(a) for a in args], cwd=ROOT, env=env)


def ensure_venv() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py runs on whatever python3 is
        sys.exit(f"dev.py: conveyor needs Python 3.11+, this is {sys.version.split()[0]}")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if PY.exists() and STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not PY.exists():
        say("creating .venv")
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
    say("installing conveyor and its dev tools into .venv")
    quiet = ["-q"] if os.environ.get("CI") else []
    subprocess.check_call(
        [str(PY), "-m", "pip", "install", *quiet, "--disable-pip-version-check", "-e", ".[dev]"],
        cwd=ROOT,
    )
    STAMP.write_text(wanted)


def test(args: list[str]) -> int:
    failures = []
    say("tests on the embedded Valkey")
    if run(PY, "-m", "pytest", "--durations=15", *args) != 0:
        failures.append("tests on Valkey")
    if os.access(REDIS, os.X_OK) and not os.environ.get("CONVEYOR_TEST_SERVER"):
        say(f"the same tests on {REDIS}, but those that depend on no server (marked once)")
        env = {**os.environ, "CONVEYOR_TEST_SERVER": REDIS}
        if run(PY, "-m", "pytest", "--durations=15", "-m", "not once", *args, env=env) != 0:
            failures.append("tests on Redis")
    say("ruff check, ruff format --check, mypy --strict src")
    if run(BIN / "ruff", "check", "src", "tests", "bench", "dev.py") != 0:
        failures.append("ruff check")
    if run(BIN / "ruff", "format", "--check", "src", "tests", "bench", "dev.py") != 0:
        failures.append("ruff format")
    if run(BIN / "mypy", "--strict", "src") != 0:
        failures.append("mypy")
    if failures:
        say("FAILED: " + ", ".join(failures))
        return 1
    say("all checks passed")
    return 0


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test", "bench", "setup"):
        print(__doc__)
        return 2
    job, args = sys.argv[1], sys.argv[2:]
    ensure_venv()
    if job == "demo":
        return run(BIN / "conveyor", "demo", *args)
    if job == "bench":
        return run(PY, "-m", "bench", *args)
    if job == "test":
        return test(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
