"""Settings: settings.toml, overridden by environment variables by name."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

import tasks

DEFAULTS = tasks.SETTINGS_FILE


def test_the_defaults_come_from_settings_toml() -> None:
    settings = tasks.load_settings(DEFAULTS, environ={})

    assert settings.cloudamqp_url == "amqp://guest:guest@localhost:5672/"
    assert settings.port == 8000
    assert settings.max_seconds == 300


def test_an_environment_variable_overrides_the_setting_of_its_name() -> None:
    settings = tasks.load_settings(DEFAULTS, environ={"PORT": "10000", "CLOUDAMQP_URL": "amqps://u:p@example.com/v"})

    assert settings.port == 10000
    assert settings.cloudamqp_url == "amqps://u:p@example.com/v"


def test_other_environment_variables_are_ignored() -> None:
    settings = tasks.load_settings(DEFAULTS, environ={"port": "1", "HOME": "/root"})

    assert settings.port == 8000


@pytest.mark.parametrize(
    "name,value,expected",
    [
        ("PORT", "http", "Expected `int`, got `str`"),
        ("PORT", "70000", "Expected `int` <= 65535"),
        ("MAX_SECONDS", "1501", "Expected `int` <= 1500"),
        ("STOP_GRACE", "0", "Expected `int` >= 1"),
        ("CLOUDAMQP_URL", "redis://localhost", "Expected `str` matching regex '^amqps?://'"),
        ("LOG_LEVEL", "LOUD", "Expected `str` matching regex '^(DEBUG|INFO|WARNING|ERROR)$'"),
    ],
)
def test_an_invalid_setting_names_itself_and_what_is_expected(name: str, value: str, expected: str) -> None:
    with pytest.raises(SystemExit) as stop:
        tasks.load_settings(DEFAULTS, environ={name: value})

    assert str(stop.value) == f"onebox: invalid setting {name}: {expected}"


def test_a_prefetch_below_the_thread_count_is_refused() -> None:
    with pytest.raises(SystemExit, match="queue_prefetch must be at least worker_threads"):
        tasks.load_settings(DEFAULTS, environ={"WORKER_THREADS": "32", "QUEUE_PREFETCH": "16"})


def test_more_event_streams_than_connections_are_refused() -> None:
    with pytest.raises(SystemExit, match="max_event_streams must be below max_connections"):
        tasks.load_settings(DEFAULTS, environ={"MAX_CONNECTIONS": "500", "MAX_EVENT_STREAMS": "500"})


def connections_and_open_files(soft: int, hard: int, max_connections: int) -> tuple[int, int, str]:
    """What connections_that_fit says in a process started with these open-file
    limits; the soft limit it leaves; what it logs."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    code = "import resource, tasks; print(tasks.connections_that_fit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"MAX_CONNECTIONS": str(max_connections), "PATH": ""},
        cwd=DEFAULTS.parent,
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    connections, open_files = done.stdout.split()
    return int(connections), int(open_files), done.stderr


def test_the_web_raises_its_open_file_limit_to_fit_max_connections() -> None:
    assert connections_and_open_files(1024, 8192, 4096)[:2] == (4096, 4096 + tasks.FILES_BESIDES_CONNECTIONS)


def test_the_web_holds_fewer_connections_when_the_hard_limit_is_lower() -> None:
    connections, open_files, logged = connections_and_open_files(1024, 2048, 4096)

    assert (connections, open_files) == (2048 - tasks.FILES_BESIDES_CONNECTIONS, 2048)
    assert "may open only 2048 files" in logged


def test_an_unknown_key_in_the_file_is_refused(tmp_path: Path) -> None:
    settings_file = tmp_path / "settings.toml"
    settings_file.write_text(DEFAULTS.read_text() + "max_secnds = 5\n")

    with pytest.raises(SystemExit, match="Object contains unknown field `max_secnds`"):
        tasks.load_settings(settings_file, environ={})


def test_an_invalid_url_is_refused_without_echoing_it() -> None:
    with pytest.raises(SystemExit) as stop:
        tasks.load_settings(DEFAULTS, environ={"CLOUDAMQP_URL": "http://user:s3cret@host/"})

    assert "s3cret" not in str(stop.value)


def test_redact_hides_the_url_password() -> None:
    url = "amqps://user:s3cret@host/vhost"

    assert tasks.redact(f"failed to reach {url}", url) == "failed to reach amqps://user:***@host/vhost"


def test_amqps_urls_check_the_server_host_name() -> None:
    settings = tasks.load_settings(DEFAULTS, environ={"CLOUDAMQP_URL": "amqps://u:p@broker.example.com/vhost"})

    parameters = tasks.connection_parameters(settings)

    assert parameters.ssl_options.server_hostname == "broker.example.com"
    assert parameters.ssl_options.context.check_hostname is True


def test_the_worker_connection_has_heartbeats_and_bounded_waits() -> None:
    settings = tasks.load_settings(DEFAULTS, environ={})

    parameters = tasks.connection_parameters(settings)

    assert parameters.heartbeat == settings.heartbeat
    assert parameters.blocked_connection_timeout is not None
    assert parameters.socket_timeout == settings.publish_timeout


def test_the_countdown_never_outlives_its_time_limit() -> None:
    time_limit_ms = tasks.countdown.options["time_limit"]

    assert time_limit_ms > tasks.settings.max_seconds * 1000
