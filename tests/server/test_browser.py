"""The web client in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright; no
browser is downloaded): the page loads, shows the live crop and step, and an ask streams in.

Without chromium (or Playwright) the test is skipped here, and fails in CI (CI=true), whose
set-up installs chromium with apt-get.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from tests.conftest import missing
from tests.server.conftest import TOKEN, uvicorn_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (one for the module)."""
    if not CHROMIUM.is_file() or shutil.which(str(CHROMIUM)) is None:
        missing(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -e '.[dev]')")
        raise
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def server(make_app: Callable[..., FastAPI]) -> Iterator[str]:
    """The service with a token, as on a phone on the local network."""
    with uvicorn_server(make_app(token=TOKEN)) as address:
        yield address


def test_the_page_shows_the_live_view_and_streams_an_answer(browser: Any, server: str) -> None:
    page = browser.new_page(viewport=PHONE)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto(f"http://{server}/#token={TOKEN}")
        page.wait_for_selector("#connection.ok", timeout=15_000)
        assert "token" not in page.url  # the token leaves the address bar
        page.wait_for_function(
            "document.getElementById('crop').naturalWidth === 448", timeout=15_000
        )
        assert page.is_visible("#gaze") and page.is_hidden("#crop-empty")
        assert page.text_content("#step").startswith("Step ")
        page.fill("#question", "What step am I on?")
        page.click("#ask")
        page.wait_for_function(
            "document.getElementById('latency').textContent !== ''", timeout=15_000
        )
        text = page.text_content("#answer")
        assert text.startswith("You are on step ") and " of 6: " in text
        assert page.text_content("#latency").startswith("first words ")
        assert page.is_enabled("#ask") and page.is_hidden("#error")
        # Chromium has speech recognition: the microphone button is offered.
        assert page.is_visible("#mic")
    finally:
        page.close()
    assert errors == []


def test_without_the_token_the_page_asks_for_it(browser: Any, server: str) -> None:
    page = browser.new_page(viewport=PHONE)
    try:
        page.goto(f"http://{server}/")
        page.wait_for_selector("#token-form", state="visible", timeout=15_000)
        assert page.text_content("#connection") == "token needed"
    finally:
        page.close()
