"""The page at GET /, in a real browser: Debian's chromium driven by Playwright.

tests/browser/page.mjs plays a person's visit against a real stack with
API_TOKEN set and says which step failed. Before a restart: without the token
the list shows the 401's detail and asks for it, and Start shows it too; a
3-second countdown reaches succeeded with a full bar; a 30-second one moves
live and Cancel stops it; a reload asks for the token again, then lists the
tasks newest first and follows the running one; a tally job started through
the API appears with its progress, message and result, and a failing one with
its error at attempt 2; more tasks than the page streams at once still all
reach succeeded; a stream the server refuses (429) is polled to its end. Then
the whole stack stops and starts again on the same queue and port, one
countdown still running; after it the page, once given the token, lists every
earlier task newest first as it ended and follows the running one live to its
end. The test checks what the workers did. npm cannot download a browser
here, so Playwright comes from npm as playwright-core alone and drives
Debian's chromium.
"""

from __future__ import annotations

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


@pytest.fixture
def page_queue(queue_name: str) -> Iterator[str]:
    """queue_name, and its events stream deleted afterwards too (once the stacks have stopped)."""
    yield queue_name
    connection = rabbit_connection()
    try:
        connection.channel().queue_delete(f"{queue_name}.events")
    finally:
        connection.close()


def start_stack_with_token(stacks: list[Process], queue_name: str, port: int) -> Process:
    """A stack whose every /tasks and /jobs route needs the token, ready."""
    # A short grace: the visit leaves a countdown running on purpose. One
    # retry: the failing job gives up at its second attempt.
    stack = start_stack(PORT=port, QUEUE_NAME=queue_name, API_TOKEN=TOKEN, STOP_GRACE=1, MAX_RETRIES=1)
    stacks.append(stack)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=40)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{stack.tail}") from None
    return stack


def visit_page(node: str, chromium: str, base: str, screenshot: Path, *before: str) -> tuple[int, str]:
    """Run a part of the visit; its exit code and output, the ids of its tasks last."""
    env = {**os.environ, "CHROMIUM": chromium}
    visit = Process([node, "page.mjs", base, str(screenshot), TOKEN, *before], env, cwd=BROWSER)
    try:
        return visit.wait(timeout=90), visit.output
    except subprocess.TimeoutExpired:
        return -1, f"the visit took over 90 s:\n{visit.output}"
    finally:
        # Chromium too, whatever became of the visit.
        visit.stop()


@pytest.mark.timeout(300)
def test_a_person_starts_watches_and_cancels_countdowns_and_finds_them_after_a_restart(
    page_queue: str, stacks: list[Process], tmp_path: Path
) -> None:
    node, npm, chromium = require_tool("node"), require_tool("npm"), require_tool("chromium")
    install_playwright(npm)
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    first = start_stack_with_token(stacks, page_queue, port)
    code, output = visit_page(node, chromium, base, tmp_path / "page.png")
    assert code == 0, f"{output}\nstack output:\n{first.tail}"
    ids = json.loads(output.splitlines()[-1])
    first.stop()

    assert (tmp_path / "page.png").read_bytes().startswith(PNG_SIGNATURE)
    first.wait_for(rf"task {ids['succeeded']} done seconds=3", timeout=0)
    first.wait_for(rf"task {ids['cancelled']} cancelled", timeout=0)
    assert f"task {ids['cancelled']} done" not in first.output
    first.wait_for(rf"Retries exceeded for message '{ids['failing']}'", timeout=0)
    # Handed back unfinished: after the restart it is still to be followed.
    assert f"task {ids['survivor']} done" not in first.output

    second = start_stack_with_token(stacks, page_queue, port)
    code, output = visit_page(node, chromium, base, tmp_path / "after.png", output.splitlines()[-1])
    assert code == 0, f"{output}\nstack output:\n{second.tail}"
    assert (tmp_path / "after.png").read_bytes().startswith(PNG_SIGNATURE)
    second.wait_for(rf"task {ids['survivor']} started seconds=\d+ attempt=1 redelivered=yes", timeout=0)
    second.wait_for(rf"task {ids['survivor']} done seconds=\d+", timeout=0)
    second.stop()
