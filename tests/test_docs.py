"""The docs hold together: links resolve, the settings table is whole, the README's first task runs as shown.

Links and anchors follow GitHub's rules, where users read these pages: a
heading's anchor is its text in lower case, without punctuation but hyphens
and underscores, spaces turned into hyphens, and "-1", "-2" added to repeats.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Process, free_port, require_tool, start_stack, wait_http

import tasks

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading's text (before duplicates are numbered)."""
    text = INLINE_CODE.sub(lambda match: match.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text stays
    text = text.replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(text):
        if match := HEADING.match(line):
            anchor = github_anchor(match.group(2))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def links(text: str) -> list[str]:
    """Every link target of the prose, inline code left out."""
    targets = []
    for line in prose_lines(text):
        targets += LINK.findall(INLINE_CODE.sub("", line))
    return targets


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of ``page`` whose file or #anchor does not exist within ``root``, each with why."""
    broken = []
    for target in links(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # http:, https:, mailto:: not this test's
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_relative_to(root) or not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file.read_text())):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(root)}")
    return broken


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("`POST /tasks`: start a countdown", "post-tasks-start-a-countdown"),
        ("Classic or quorum queues: `QUEUE_TYPE`", "classic-or-quorum-queues-queue_type"),
        ("Fly.io", "flyio"),
        ("How long a first run takes (compose)", "how-long-a-first-run-takes-compose"),
        ("CloudAMQP's free plans, and what onebox uses of them", "cloudamqps-free-plans-and-what-onebox-uses-of-them"),
        ("Run it, test it", "run-it-test-it"),
    ],
)
def test_a_heading_anchor_follows_githubs_rule(heading: str, anchor: str) -> None:
    assert github_anchor(heading) == anchor


def test_a_repeated_heading_gets_a_numbered_anchor() -> None:
    assert anchors("## Render\n\n### Render\n\n```\n## not a heading\n```\n") == {"render", "render-1"}


def test_a_missing_file_or_heading_is_reported(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n")
    page = tmp_path / "page.md"
    page.write_text("## Here\n[ok](#here) [gone](#there) [none](nowhere.md) [far](../x.md) `[code](nowhere.md)`\n")

    assert broken_links(page, tmp_path) == [
        "#there: no heading #there in page.md",
        "nowhere.md: no such file",
        "../x.md: no such file",
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_the_readme_maps_every_docs_page() -> None:
    readme_links = {target.partition("#")[0] for target in links((ROOT / "README.md").read_text())}

    assert {f"docs/{page.name}" for page in PAGES[1:]} <= readme_links


# -- The settings table ---------------------------------------------------------------------

SETTINGS_ROW = re.compile(r"^\| `(\w+)` \| `(\w+)` \| (.*?) \| .* \|$", re.MULTILINE)


def settings_table() -> list[tuple[str, str, str]]:
    return SETTINGS_ROW.findall((ROOT / "docs" / "settings.md").read_text())


def test_the_settings_table_lists_exactly_the_settings_that_exist() -> None:
    names = [name for name, _, _ in settings_table()]

    assert sorted(names) == sorted(tasks.Settings.__struct_fields__)
    assert len(names) == len(set(names))


def test_each_setting_row_names_its_environment_variable() -> None:
    assert all(variable == name.upper() for name, variable, _ in settings_table())


def test_each_setting_row_gives_the_default_of_settings_toml() -> None:
    defaults = tomllib.loads(tasks.SETTINGS_FILE.read_text())

    for name, _, shown in settings_table():
        value = defaults[name]
        if value == "":
            assert shown.startswith("empty"), name
        else:
            expected = str(value).lower() if isinstance(value, bool) else str(value)
            assert shown == f"`{expected}`", name


# -- The README's first task, as a newcomer copies it -------------------------------------------

README = (ROOT / "README.md").read_text()
FIRST_TASK = README.split("## A first task", 1)[1].split("\n## ", 1)[0]


def shown_session() -> list[tuple[list[str], str]]:
    """The first task's console session: each curl command and the JSON it shows."""
    block = re.search(r"```console\n(.*?)```", FIRST_TASK, re.DOTALL)
    assert block is not None, "the section has no console block"
    session: list[tuple[list[str], str]] = []
    for line in block.group(1).splitlines():
        if line.startswith("$ "):
            session.append((shlex.split(line[2:], comments=True), ""))
        elif line.startswith("{"):
            session[-1] = (session[-1][0], line)
    return session


def shown_json(shown: str) -> dict[str, Any]:
    """A shown body; "…" stands for fields left out."""
    return dict(json.loads(shown.replace(",…}", "}")))


def run_curl(command: list[str], port: int) -> str:
    command = [argument.replace("localhost:8000", f"127.0.0.1:{port}") for argument in command]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=10).stdout


def test_the_readme_first_task_answers_as_shown(stacks: list[Process], queue_name: str) -> None:
    require_tool("curl")
    (post, posted), (get, finished) = shown_session()
    port = free_port()
    stacks.append(start_stack(PORT=port, QUEUE_NAME=queue_name))
    wait_http(f"http://127.0.0.1:{port}/readyz", timeout=30)

    head, _, body = run_curl(post, port).partition("\n\n")  # text mode: CRLF read as LF
    assert head.splitlines()[0] == "HTTP/1.1 202 Accepted"
    accepted, expected = json.loads(body), shown_json(posted)
    assert accepted.keys() == expected.keys()
    assert (accepted["seconds"], accepted["status"]) == (expected["seconds"], expected["status"])

    get = [argument.replace(expected["id"], accepted["id"]) for argument in get]
    expected_end = shown_json(finished) | {"id": accepted["id"]}
    deadline = time.monotonic() + 15
    while (view := json.loads(run_curl(get, port)))["status"] != expected_end["status"]:
        assert time.monotonic() < deadline, view
        time.sleep(0.5)
    assert {key: view[key] for key in expected_end} == expected_end
