"""The dev container (.devcontainer/) as the Dev Containers CLI reads and starts it, driving podman.

The CLI is VS Code's own engine for "Reopen in Container", from npm
(tests/devcontainer/package.json, locked by package-lock.json). It drives
podman and podman-compose, as on a laptop with podman. This machine needs what
tests/test_compose.py gives it, compose.host.yaml (no usable bridge network)
and local images (no registry), and two more things, each for a known gap:

- podman-compose's `config` prints a service's build args as a list, where
  docker compose prints a mapping, and the CLI reads only a mapping when it
  looks for the image's base (containers/podman-compose#1174): it would look
  for the Containerfile's default base, which no registry serves here. The
  CLI is pointed at a wrapper of podman-compose that prints the mapping.
- podman 4.3's builds here need the host's network and must never pull: a
  containers.conf of the test's own says so.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import ROOT, copy_checkout, countdown_refusal, free_port, require_tool, wait_http

CLI_FOLDER = ROOT / "tests" / "devcontainer"
CONFIG_FILE = ROOT / ".devcontainer" / "devcontainer.json"
PODMAN_COMPOSE = Path(sys.executable).parent / "podman-compose"

# podman-compose, with `config` printing build args as docker compose does: a mapping, where a
# bare name takes its value from the environment.
COMPOSE_WRAPPER = f"""#!{sys.executable}
import os, subprocess, sys, yaml
config = "config" in sys.argv
result = subprocess.run([{str(PODMAN_COMPOSE)!r}, *sys.argv[1:]], capture_output=config, text=True, check=False)
if config:
    sys.stderr.write(result.stderr)
    merged = yaml.safe_load(result.stdout) or {{}}
    for service in merged.get("services", {{}}).values():
        args = service.get("build", {{}}).get("args")
        if isinstance(args, list):
            pairs = (arg.partition("=") for arg in args)
            service["build"]["args"] = {{name: value if sep else os.environ.get(name) for name, sep, value in pairs}}
    sys.stdout.write(yaml.safe_dump(merged))
sys.exit(result.returncode)
"""


def read_config() -> dict[str, Any]:
    """devcontainer.json, whose comments JSON does not allow."""
    text = re.sub(r"^\s*//.*$", "", CONFIG_FILE.read_text(), flags=re.MULTILINE)
    return dict(json.loads(text))


def devcontainer_cli() -> list[str]:
    """The CLI at the version package-lock.json pins; node_modules is not committed."""
    node, npm = require_tool("node"), require_tool("npm")
    script = CLI_FOLDER / "node_modules" / "@devcontainers" / "cli" / "devcontainer.js"
    if not script.is_file():
        install = [npm, "ci", "--no-audit", "--no-fund"]
        result = subprocess.run(install, cwd=CLI_FOLDER, capture_output=True, text=True, timeout=180, check=False)
        assert result.returncode == 0, f"npm ci failed:\n{result.stdout}{result.stderr}"
    return [node, str(script)]


def merged_compose(files: list[Path], env: dict[str, str]) -> dict[str, Any]:
    """The compose files as podman-compose merges them."""
    command = [str(PODMAN_COMPOSE), *(part for file in files for part in ("-f", str(file))), "config"]
    result = subprocess.run(
        command, cwd=files[0].parent, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return dict(yaml.safe_load(result.stdout))


def compose_files(config: dict[str, Any], folder: Path) -> list[Path]:
    return [(folder / ".devcontainer" / name).resolve() for name in config["dockerComposeFile"]]


def test_the_cli_reads_a_compose_dev_container_of_onebox_and_rabbitmq() -> None:
    require_tool("podman")
    result = subprocess.run(
        [*devcontainer_cli(), "read-configuration", "--workspace-folder", str(ROOT), "--docker-path", "podman"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    read = json.loads(result.stdout)

    config = read["configuration"]
    assert (config["service"], config["workspaceFolder"], config["overrideCommand"]) == ("onebox", "/app", False)
    assert config["runServices"] == ["rabbitmq", "onebox"]
    assert read["workspace"]["workspaceFolder"] == "/app"
    assert compose_files(config, ROOT) == [
        ROOT / "compose.yaml",
        ROOT / "compose.dev.yaml",
        ROOT / ".devcontainer" / "compose.yaml",
    ]


def test_the_dev_container_mounts_the_checkout_writable_with_reload_and_publishes_its_ports() -> None:
    require_tool("podman")
    config = read_config()

    merged = merged_compose(compose_files(config, ROOT), dict(os.environ))

    services = merged["services"]
    assert set(config["runServices"]) <= services.keys()
    onebox = services[config["service"]]
    assert onebox["environment"]["RELOAD"] == "true"
    assert onebox["volumes"] == [f".:{config['workspaceFolder']}"]  # read-write, unlike compose.dev.yaml alone
    published = {
        port.rpartition(":")[0].rpartition(":")[2] for service in services.values() for port in service["ports"]
    }
    assert set(config["portsAttributes"]) == published == {"8000", "15672"}


# -- Started by the CLI ---------------------------------------------------------------------------


@dataclass
class DevContainer:
    """A copy of the checkout opened by the CLI, as VS Code's "Reopen in Container" does."""

    folder: Path
    env: dict[str, str]
    cli: list[str]
    compose: Path
    project: str

    def run(self, *command: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        options = ["--workspace-folder", str(self.folder), "--docker-path", "podman"]
        options += ["--docker-compose-path", str(self.compose)]
        command_line = [*self.cli, command[0], *options, *command[1:]]
        return subprocess.run(command_line, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.env['ONEBOX_PORT']}{path}"


def containers_conf(path: Path) -> dict[str, str]:
    """A containers.conf that adds host networking and no pulls to the machine's (CONTAINERS_CONF)."""
    base = Path(os.environ["CONTAINERS_CONF"]) if "CONTAINERS_CONF" in os.environ else None
    settings = tomllib.loads(base.read_text()) if base else {}
    settings.setdefault("containers", {})["netns"] = "host"
    settings.setdefault("engine", {})["pull_policy"] = "never"
    lines = []
    for table, values in settings.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return {"CONTAINERS_CONF": str(path)}


@pytest.fixture
def dev_container(tmp_path: Path) -> Iterator[DevContainer]:
    require_tool("podman")
    cli = devcontainer_cli()
    name = f"onebox-dc-{uuid.uuid4().hex[:8]}"
    folder = tmp_path / name
    folder.mkdir()
    copy_checkout(folder, skip=("tests/", "bench/", "docs/"))
    for path in (tmp_path, *folder.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)  # the container's user reads the checkout
    config = read_config()
    config["dockerComposeFile"].insert(2, "../compose.host.yaml")
    (folder / ".devcontainer" / "devcontainer.json").write_text(json.dumps(config))
    compose = tmp_path / "podman-compose"
    compose.write_text(COMPOSE_WRAPPER)
    compose.chmod(0o755)
    env = dict(os.environ) | {
        "ONEBOX_PORT": str(free_port()),
        "RABBITMQ_PORT": str(free_port()),
        "RABBITMQ_DIST_PORT": str(free_port()),
        "RABBITMQ_MANAGEMENT_PORT": str(free_port()),
        "RABBITMQ_NODENAME": f"{name}@localhost",
    }
    if "BASE_IMAGE" in env:  # local images: never pull, build on the host's network
        env |= containers_conf(tmp_path / "containers.conf")
    # The CLI names the compose project after the folder, without its hyphens.
    container = DevContainer(folder, env, cli, compose, project=name.replace("-", ""))
    try:
        yield container
    finally:
        files = [part for file in compose_files(config, folder) for part in ("-f", str(file))]
        subprocess.run(
            [str(PODMAN_COMPOSE), "-p", container.project, *files, "down", "-v", "-t", "0"],
            cwd=folder, env=env, capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        subprocess.run(["podman", "rmi", f"localhost/{container.project}_onebox"], capture_output=True, check=False)


def test_the_dev_container_serves_the_api_beside_rabbitmq_and_reloads_a_saved_change(
    dev_container: DevContainer,
) -> None:
    up = dev_container.run("up")
    assert up.returncode == 0, up.stdout[-6000:]
    outcome = json.loads(up.stdout.strip().splitlines()[-1])
    assert (outcome["outcome"], outcome["remoteWorkspaceFolder"]) == ("success", "/app")
    assert outcome["composeProjectName"] == dev_container.project

    wait_http(dev_container.url("/readyz"), timeout=120)
    task = httpx.post(dev_container.url("/tasks"), json={"seconds": 1})
    assert task.status_code == 202, task.text
    deadline = time.monotonic() + 30
    while httpx.get(dev_container.url(f"/tasks/{task.json()['id']}")).json()["status"] != "succeeded":
        assert time.monotonic() < deadline, "the countdown did not finish"
        time.sleep(0.5)

    # The editor saves in the container, to the checkout; the web server reloads.
    save = dev_container.run("exec", "sed", "-i", "s/^max_seconds = 300$/max_seconds = 7/", "settings.toml")
    assert save.returncode == 0, save.stderr[-4000:]
    assert "\nmax_seconds = 7\n" in (dev_container.folder / "settings.toml").read_text()
    deadline = time.monotonic() + 60
    while "<= 7" not in (detail := countdown_refusal(dev_container.url(""), 8)):
        assert time.monotonic() < deadline, f"the web server still says {detail!r}"
        time.sleep(0.5)
