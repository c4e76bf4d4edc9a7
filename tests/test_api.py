"""The HTTP contract, fast: the app in-process with a publisher that records, and no broker."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import dramatiq
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import TestClient

import main
import tasks


class OfflineLink(main.BrokerLink):
    """Ready while ``connected``, as told; never connects."""

    def __init__(self, settings: tasks.Settings = tasks.settings) -> None:
        super().__init__(settings)
        self.connected = True

    @property
    def ready(self) -> bool:
        return self.connected

    async def run(self) -> None:
        self.tried.set()
        await asyncio.Event().wait()


class RecordingPublisher(main.TaskPublisher):
    """Takes every message as confirmed, or fails as told; no broker."""

    link: OfflineLink

    def __init__(self, settings: tasks.Settings = tasks.settings) -> None:
        super().__init__(OfflineLink(settings))
        self.messages: list[dramatiq.Message[Any]] = []
        self.dues: list[float | None] = []
        self.failure: main.BrokerUnavailable | None = None

    async def publish(self, message: dramatiq.Message[Any], due: float | None = None) -> None:
        if self.failure is not None:
            raise self.failure
        self.messages.append(message)
        self.dues.append(due)


def caught_up(publisher: main.TaskPublisher) -> main.EventsFeed:
    """A feed with no past to read: without a broker there is none."""
    feed = main.EventsFeed(publisher)
    feed.caught_up.set()
    return feed


def offline_app(publisher: RecordingPublisher, feed: main.EventsFeed | None = None) -> Litestar:
    return main.create_app(publisher.link, publisher, feed or caught_up(publisher))


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def feed(publisher: RecordingPublisher) -> main.EventsFeed:
    return caught_up(publisher)


@pytest.fixture
def client(publisher: RecordingPublisher, feed: main.EventsFeed) -> Iterator[TestClient[Any]]:
    with TestClient(offline_app(publisher, feed)) as client:
        yield client


def post_json(client: TestClient[Any], body: bytes, content_type: str = "application/json") -> Any:
    return client.post("/tasks", content=body, headers={"Content-Type": content_type})


def test_a_valid_task_is_accepted_with_its_id(client: TestClient[Any], publisher: RecordingPublisher) -> None:
    response = client.post("/tasks", json={"seconds": 5})

    assert response.status_code == 202
    body = response.json()
    assert set(body) == {"id", "seconds", "status", "queued_at"}
    assert body["seconds"] == 5
    assert body["status"] == "queued"
    assert body["id"] == publisher.messages[0].message_id
    assert body["queued_at"].endswith("Z")


def test_the_published_message_is_the_countdown_actors(client: TestClient[Any], publisher: RecordingPublisher) -> None:
    client.post("/tasks", json={"seconds": 7})

    [message] = publisher.messages
    assert message.actor_name == "countdown"
    assert message.queue_name == tasks.settings.queue_name
    assert message.args == (7,)


def test_max_seconds_is_accepted(client: TestClient[Any]) -> None:
    response = client.post("/tasks", json={"seconds": tasks.settings.max_seconds})

    assert response.status_code == 202


BAD_BODIES = {
    "a string number": (b'{"seconds": "5"}', "Expected `int`, got `str` - at `$.seconds`"),
    "a float": (b'{"seconds": 5.0}', "Expected `int`, got `float` - at `$.seconds`"),
    "a fraction": (b'{"seconds": 2.5}', "Expected `int`, got `float` - at `$.seconds`"),
    "a boolean": (b'{"seconds": true}', "Expected `int`, got `bool` - at `$.seconds`"),
    "null": (b'{"seconds": null}', "Expected `int`, got `null` - at `$.seconds`"),
    "zero": (b'{"seconds": 0}', "Expected `int` >= 1 - at `$.seconds`"),
    "a negative number": (b'{"seconds": -3}', "Expected `int` >= 1 - at `$.seconds`"),
    "more than max_seconds": (b'{"seconds": 301}', "Expected `int` <= 300 - at `$.seconds`"),
    "a huge integer": (b'{"seconds": 18446744073709551616}', "Expected `int` <= 300 - at `$.seconds`"),
    "a missing field": (b"{}", "Object missing required field `seconds`"),
    "an unknown field": (b'{"seconds": 5, "priority": 1}', "Object contains unknown field `priority`"),
    "an array": (b"[5]", "Expected `object`, got `array`"),
    "a bare number": (b"5", "Expected `object`, got `int`"),
    "truncated JSON": (b'{"seconds": 5', "Input data was truncated"),
    "trailing garbage": (b'{"seconds": 5} x', "JSON is malformed: trailing characters (byte 16)"),
    "NaN": (b'{"seconds": NaN}', "JSON is malformed: invalid character (byte 12)"),
    "an empty body": (b"", 'the body is empty; expected {"seconds": <integer>}'),
    "not UTF-8": (b"\xff", "JSON is malformed: invalid character (byte 0)"),
}


@pytest.mark.parametrize("body,detail", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_a_bad_body_is_a_400_that_says_what_and_where(client: TestClient[Any], body: bytes, detail: str) -> None:
    response = post_json(client, body)

    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json() == {"status": 400, "title": "Bad Request", "detail": detail}


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_body_that_is_not_json_is_a_415(client: TestClient[Any], content_type: str) -> None:
    response = post_json(client, b'{"seconds": 5}', content_type)

    assert response.status_code == 415
    assert response.json()["detail"] == "the body must be JSON: Content-Type: application/json"


def test_json_with_a_charset_is_json(client: TestClient[Any]) -> None:
    response = post_json(client, b'{"seconds": 5}', "application/json; charset=utf-8")

    assert response.status_code == 202


def test_a_body_over_the_size_limit_is_a_413(client: TestClient[Any], publisher: RecordingPublisher) -> None:
    padding = " " * tasks.settings.max_body_bytes

    response = post_json(client, f'{{"seconds": 5{padding}}}'.encode())

    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert publisher.messages == []


def test_an_unavailable_broker_is_a_503_with_the_reason(client: TestClient[Any], publisher: RecordingPublisher) -> None:
    publisher.failure = main.BrokerUnavailable("cannot reach the broker: ConnectionRefusedError")

    response = client.post("/tasks", json={"seconds": 5})

    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {
        "status": 503,
        "title": "Service Unavailable",
        "detail": "cannot reach the broker: ConnectionRefusedError",
    }


def test_healthz_answers_without_the_broker(client: TestClient[Any], publisher: RecordingPublisher) -> None:
    publisher.link.connected = False

    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_is_ready_while_connected(client: TestClient[Any]) -> None:
    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


def test_readyz_is_a_503_with_the_reason_while_disconnected(
    client: TestClient[Any], publisher: RecordingPublisher
) -> None:
    publisher.link.connected = False
    publisher.link.problem = "cannot reach the broker: TimeoutError"

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["detail"] == "cannot reach the broker: TimeoutError"


def test_an_unknown_path_is_a_404_problem(client: TestClient[Any]) -> None:
    response = client.get("/nope")

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


def test_a_wrong_method_is_a_405_problem(client: TestClient[Any]) -> None:
    response = client.put("/tasks")

    assert response.status_code == 405
    assert response.headers["content-type"] == "application/problem+json"


def test_the_docs_page_loads_its_assets_from_the_app(client: TestClient[Any]) -> None:
    page = client.get("/docs")

    assert page.status_code == 200
    assert "cdn" not in page.text.lower()
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "swagger-ui-standalone-preset.js"):
        assert f"/docs/assets/{asset}" in page.text
        assert client.get(f"/docs/assets/{asset}").status_code == 200


def test_problem_bodies_are_json_objects(client: TestClient[Any]) -> None:
    response = post_json(client, b"{")

    assert isinstance(json.loads(response.content), dict)


def hardened_client(publisher: RecordingPublisher | None = None, **changes: Any) -> TestClient[Any]:
    """The app offline, with these settings changed; on ``publisher`` when one is given."""
    settings = msgspec.structs.replace(tasks.settings, **changes)
    if publisher is None:
        publisher = RecordingPublisher(settings)
    publisher.settings = publisher.link.settings = settings
    return TestClient(offline_app(publisher))


TOKEN = "a-long-enough-test-token"


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token-of-some-length", f"Basic {TOKEN}", TOKEN])
def test_with_an_api_token_a_task_without_it_is_a_401(authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    with hardened_client(api_token=TOKEN) as client:
        response = client.post("/tasks", json={"seconds": 1}, headers=headers)

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="onebox"'
    assert response.json()["detail"] == "a valid bearer token is required"


def test_with_an_api_token_a_task_with_it_is_accepted() -> None:
    with hardened_client(api_token=TOKEN) as client:
        response = client.post("/tasks", json={"seconds": 1}, headers={"Authorization": f"Bearer {TOKEN}"})

    assert response.status_code == 202


def test_with_an_api_token_health_needs_none() -> None:
    with hardened_client(api_token=TOKEN) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_the_api_token_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with hardened_client(api_token=TOKEN) as client:
        client.post("/tasks", json={"seconds": 1}, headers={"Authorization": f"Bearer {TOKEN}"})
        client.post("/tasks", json={"seconds": 1}, headers={"Authorization": f"Bearer {TOKEN}x"})

    assert TOKEN not in caplog.text


def test_a_client_over_the_rate_limit_gets_a_429_with_retry_after() -> None:
    with hardened_client(rate_limit_per_minute=3) as client:
        answers = [client.post("/tasks", json={"seconds": 1}) for _ in range(4)]

    assert [answer.status_code for answer in answers] == [202, 202, 202, 429]
    # Sliding: the next passes once the full window has shrunk in weight, up to two windows away.
    assert 0 < int(answers[3].headers["retry-after"]) <= 2 * 60
    assert "retry-after" not in answers[2].headers
    assert answers[3].headers["content-type"] == "application/problem+json"


def test_the_rate_limit_counts_only_writes() -> None:
    with hardened_client(rate_limit_per_minute=1) as client:
        client.post("/tasks", json={"seconds": 1})

        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        assert client.get("/tasks").status_code == 200


def test_cancels_count_against_the_rate_limit() -> None:
    with hardened_client(rate_limit_per_minute=2) as client:
        task_id = client.post("/tasks", json={"seconds": 1}).json()["id"]
        first = client.delete(f"/tasks/{task_id}")
        second = client.delete(f"/tasks/{task_id}")

    assert first.status_code != 429
    assert second.status_code == 429


def test_behind_a_proxy_each_client_address_has_its_own_limit() -> None:
    with hardened_client(rate_limit_per_minute=1, client_ip_header="Fly-Client-IP") as client:
        first = client.post("/tasks", json={"seconds": 1}, headers={"Fly-Client-IP": "203.0.113.1"})
        second = client.post("/tasks", json={"seconds": 1}, headers={"Fly-Client-IP": "203.0.113.2"})
        again = client.post("/tasks", json={"seconds": 1}, headers={"Fly-Client-IP": "203.0.113.1"})

    assert (first.status_code, second.status_code, again.status_code) == (202, 202, 429)


def test_forged_forwarded_for_entries_do_not_escape_the_limit() -> None:
    with hardened_client(rate_limit_per_minute=1, client_ip_header="X-Forwarded-For") as client:
        first = client.post("/tasks", json={"seconds": 1}, headers={"X-Forwarded-For": "1.1.1.1, 198.51.100.7"})
        forged = client.post("/tasks", json={"seconds": 1}, headers={"X-Forwarded-For": "2.2.2.2, 198.51.100.7"})

    assert (first.status_code, forged.status_code) == (202, 429)


def test_proxy_headers_are_ignored_unless_configured() -> None:
    with hardened_client(rate_limit_per_minute=1) as client:
        first = client.post("/tasks", json={"seconds": 1}, headers={"Fly-Client-IP": "203.0.113.1"})
        second = client.post("/tasks", json={"seconds": 1}, headers={"Fly-Client-IP": "203.0.113.2"})

    assert (first.status_code, second.status_code) == (202, 429)


def test_the_rate_limit_is_on_by_default() -> None:
    assert tasks.load_settings(tasks.SETTINGS_FILE, environ={}).rate_limit_per_minute == 60


def test_cors_is_off_unless_configured(client: TestClient[Any]) -> None:
    response = client.options(
        "/tasks", headers={"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}
    )

    assert "access-control-allow-origin" not in response.headers


def test_a_configured_origin_may_call_the_api() -> None:
    with hardened_client(cors_origins="https://app.example, https://other.example") as client:
        response = client.options(
            "/tasks", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
        )

    assert response.headers["access-control-allow-origin"] == "https://app.example"


@pytest.mark.parametrize(
    "method,path,body", [("POST", "/tasks", b'{"seconds": 1}'), ("GET", "/nope", b""), ("POST", "/tasks", b"{")]
)
def test_every_response_carries_the_security_headers(
    client: TestClient[Any], method: str, path: str, body: bytes
) -> None:
    response = client.request(method, path, content=body, headers={"Content-Type": "application/json"})

    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
