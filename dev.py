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
import shutil
import subprocess
import sys
import tempfile
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


#: the passes' temporary directories: removed when every check passed, kept for a look if not
TEMP_DIRS: list[str] = []


def pytest_args(kind: str, args: list[str]) -> list[str]:
    """pytest's arguments for one pass, with a temporary directory of its own (two passes
    running at once must not clean up each other's)."""
    base = tempfile.mkdtemp(prefix=f"conveyor-tests-{kind}-")
    TEMP_DIRS.append(base)
    return [str(PY), "-m", "pytest", f"--basetemp={base}", "--durations=15", *args]


def test(args: list[str]) -> int:
    """The Valkey pass, and the Redis pass beside it (each test starts servers of its own on
    free ports, so the two do not meet): on two cores the whole check takes about as long as
    its longer pass. ``CONVEYOR_TEST_SERIAL=1`` runs them one after the other."""
    failures = []
    on_redis = os.access(REDIS, os.X_OK) and not os.environ.get("CONVEYOR_TEST_SERVER")
    serial = os.environ.get("CONVEYOR_TEST_SERIAL", "") not in ("", "0")
    redis_env = {**os.environ, "CONVEYOR_TEST_SERVER": REDIS}
    redis_command = pytest_args("redis", ["-m", "not once", *args])
    what = f"the same tests on {REDIS}, but those that depend on no server (marked once)"
    alongside, log = None, Path(os.devnull)
    if on_redis and not serial:
        log = Path(tempfile.mkstemp(prefix="conveyor-tests-redis-", suffix=".log")[1])
        say(f"{what}, alongside; printed when done")
        with log.open("wb") as out:
            alongside = subprocess.Popen(
                redis_command, cwd=ROOT, env=redis_env, stdout=out, stderr=subprocess.STDOUT
            )
    say("tests on the embedded Valkey")
    if run(*pytest_args("valkey", args)) != 0:
        failures.append("tests on Valkey")
    if on_redis:
        if alongside is None:
            say(what)
            code = run(*redis_command, env=redis_env)
        else:
            code = alongside.wait()
            say(f"the tests on {REDIS}, run alongside:")
            sys.stdout.flush()
            sys.stdout.buffer.write(log.read_bytes())
            sys.stdout.flush()
            log.unlink()
        if code != 0:
            failures.append("tests on Redis")
    say("ruff check, ruff format --check, mypy --strict src")
    if run(BIN / "ruff", "check", "src", "tests", "bench", "dev.py") != 0:
        failures.append("ruff check")
    if run(BIN / "ruff", "format", "--check", "src", "tests", "bench", "dev.py") != 0:
        failures.append("ruff format")
    if run(BIN / "mypy", "--strict", "src") != 0:
        failures.append("mypy")
    if failures:
        say(
            "FAILED: "
            + ", ".join(failures)
            + "; the tests' files are in "
            + " and ".join(TEMP_DIRS)
        )
        return 1
    for directory in TEMP_DIRS:
        shutil.rmtree(directory, ignore_errors=True)
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
