"""The page at GET /, in a real browser: Debian's chromium driven by Playwright.

tests/browser/page.mjs plays a person's visit against a real stack and says
which step failed: Start without the token shows the 401's detail; a 3-second
countdown reaches succeeded with a full bar; a 30-second one moves live and
Cancel stops it; a reload lists the tasks newest first and follows the running
one; a tally job started through the API appears with its progress, message
and result, and a failing one with its error at attempt 2; more tasks than the
page streams at once still all reach succeeded. This
test starts the stack, runs the visit and checks what the worker did. npm
cannot download a browser here, so Playwright comes from npm as
playwright-core alone and drives Debian's chromium.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Process, free_port, rabbit_connection, require_tool, start_stack, wait_http

BROWSER = ROOT / "tests" / "browser"
TOKEN = "page-test-token-0123456789"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def install_playwright(npm: str) -> None:
    """playwright-core at the version package-lock.json pins; node_modules is not committed."""
    if (BROWSER / "node_modules" / "playwright-core").is_dir():
        return
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"], cwd=BROWSER, capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, f"npm ci failed:\n{result.stdout}{result.stderr}"


@contextlib.contextmanager
def stack_with_token(queue_name: str) -> Iterator[tuple[Process, str]]:
    """A stack whose POST and DELETE need the token; stopped, and its stream and exchange deleted, afterwards."""
    port = free_port()
    # A short grace: the visit leaves a countdown running on purpose. One
    # retry: the failing job gives up at its second attempt.
    stack = start_stack(PORT=port, QUEUE_NAME=queue_name, API_TOKEN=TOKEN, STOP_GRACE=1, MAX_RETRIES=1)
    try:
        base = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{base}/readyz")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{stack.tail}") from None
        yield stack, base
    finally:
        stack.stop()
        connection = rabbit_connection()
        try:
            channel = connection.channel()
            channel.queue_delete(f"{queue_name}.cancellations")
            channel.exchange_delete(f"{queue_name}.events")
        finally:
            connection.close()


def visit_page(node: str, base: str, screenshot: Path, chromium: str) -> tuple[int, str]:
    """Run the visit; its exit code and output, the ids of its tasks last."""
    visit = Process([node, "page.mjs", base, str(screenshot), TOKEN, chromium], dict(os.environ), cwd=BROWSER)
    try:
        return visit.wait(timeout=90), visit.output
    except subprocess.TimeoutExpired:
        return -1, f"the visit took over 90 s:\n{visit.output}"
    finally:
        # Chromium too, whatever became of the visit.
        visit.stop()


@pytest.mark.timeout(150)
def test_a_person_starts_watches_and_cancels_countdowns_in_chromium(queue_name: str, tmp_path: Path) -> None:
    node, npm, chromium = require_tool("node"), require_tool("npm"), require_tool("chromium")
    install_playwright(npm)
    screenshot = tmp_path / "page.png"

    with stack_with_token(queue_name) as (stack, base):
        code, output = visit_page(node, base, screenshot, chromium)

        assert code == 0, f"{output}\nstack output:\n{stack.tail}"
        ids = json.loads(output.splitlines()[-1])
        assert screenshot.read_bytes().startswith(PNG_SIGNATURE)
        stack.wait_for(rf"task {ids['succeeded']} done seconds=3", timeout=0)
        stack.wait_for(rf"task {ids['cancelled']} cancelled", timeout=0)
        assert f"task {ids['cancelled']} done" not in stack.output
        stack.wait_for(rf"Retries exceeded for message '{ids['failing']}'", timeout=0)
