"""The README's Python examples run as written, against the test server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    r = namespace["r"]
    r.delete("orders", "clicks", "visits", "{orders}:in", "{orders}:priced")  # type: ignore[attr-defined]
    r.delete(*r.keys("{orders}:in:idem:*"))  # type: ignore[attr-defined]


def test_readme_examples_that_start_with_imports_run_on_their_own(
    monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """A block that begins with its imports claims to be complete: it runs in a namespace of
    its own (the asyncio example once needed ``conveyor`` from an earlier block)."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    whole = [b for b in blocks if b.startswith("import ")]
    assert len(whole) >= 2
    for block in whole:
        exec(compile(block, str(README), "exec"), {})
