"""The web dashboard: a page that shows streams, groups, consumers and dead letters live, and
(when allowed) replays or purges dead letters and cleans up after dead consumers.

Needs starlette and uvicorn, the ``dashboard`` extra (``pip install 'conveyor[dashboard]'``).
This module imports neither; ``conveyor.contrib.dashboard.app`` does, so ``require_dashboard()`` can
say what to install before anything fails. ``conveyor.contrib.dashboard.board`` (what is shown and
done, no HTTP) needs only conveyor itself. The page's assets are in ``static/``, served by the
dashboard itself: it works offline, behind a firewall, with no CDN.

>>> from conveyor.contrib.dashboard.app import create_app      # doctest: +SKIP
>>> from conveyor.contrib.dashboard.board import Board         # doctest: +SKIP
>>> app = create_app(Board(r, ["orders"], group="billing"))   # doctest: +SKIP
"""

from __future__ import annotations

__all__ = ["INSTALL_HINT", "require_dashboard"]

INSTALL_HINT = "pip install 'conveyor[dashboard]'"


def require_dashboard() -> None:
    """Raise ImportError with the install hint when starlette or uvicorn is not installed.

    >>> require_dashboard()   # doctest: +SKIP
    """
    for module in ("starlette", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            raise ImportError(
                f"the dashboard needs {module}, which is not installed: {INSTALL_HINT}"
            ) from None
