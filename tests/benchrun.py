"""Run one benchmark module (``python -m bench.<name> ... --json``) and return its JSON report.

The benchmark uses the server in ``CONVEYOR_TEST_SERVER`` when it is set (``--server-binary``),
else its own embedded valkey. A non-zero exit fails the test with the benchmark's stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run_bench(module: str, *args: str, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", module, *args, "--json"]
    binary = os.environ.get("CONVEYOR_TEST_SERVER")
    if binary:
        cmd += ["--server-binary", binary]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    return report
