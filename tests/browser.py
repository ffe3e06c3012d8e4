"""A real browser for the dashboard's tests: Debian's headless Chromium, driven by Selenium.

``ensure_chromium()`` installs ``chromium`` and ``chromium-driver`` with apt-get when they are
missing (the tests run as root in CI), and fails loudly, with apt-get's words, when it cannot:
a browser test is never skipped in silence. ``headless_chromium()`` runs the browser with
Debian's chromedriver (``Service(CHROMEDRIVER)``): Selenium Manager downloads nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver

__all__ = ["CHROMEDRIVER", "CHROMIUM", "ensure_chromium", "headless_chromium"]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PACKAGES = ("chromium", "chromium-driver")
#: apt-get waits this long for another apt or dpkg to let go of its lock
_LOCK_WAIT_S = 300
_APT_TIMEOUT_S = 900


def _installed() -> bool:
    return os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = f"DPkg::Lock::Timeout={_LOCK_WAIT_S}"
    return subprocess.run(
        ["apt-get", "-o", lock, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=_APT_TIMEOUT_S,
        check=False,
    )


def ensure_chromium() -> None:
    """Install Chromium and its driver with apt-get unless they are there; fail the test with
    apt-get's output when that does not work (then run ``apt-get install -y chromium
    chromium-driver`` by hand to see why)."""
    if _installed():
        return
    hint = f"the browser tests need {CHROMIUM} and {CHROMEDRIVER} (apt-get install -y " + (
        " ".join(PACKAGES) + ")"
    )
    if shutil.which("apt-get") is None:
        pytest.fail(f"{hint}, and there is no apt-get to install them with", pytrace=False)
    result = _apt_get("install", "-y", *PACKAGES)
    if result.returncode != 0:  # stale package lists: read them again, once
        _apt_get("update")
        result = _apt_get("install", "-y", *PACKAGES)
    if result.returncode != 0 or not _installed():
        said = (result.stdout + result.stderr).strip().splitlines()[-15:]
        pytest.fail(
            f"{hint}: apt-get install failed (exit {result.returncode}):\n" + "\n".join(said),
            pytrace=False,
        )


@contextmanager
def headless_chromium(width: int = 1280, height: int = 900) -> Iterator[WebDriver]:
    """A headless Chromium of ``width`` x ``height`` CSS pixels, with a profile of its own;
    quit, and its profile removed, after the block."""
    options = Options()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="conveyor-chromium-")
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container: Chromium's sandbox needs user namespaces
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={width},{height}",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(argument)
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            driver.set_page_load_timeout(60)
            yield driver
        finally:
            driver.quit()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
