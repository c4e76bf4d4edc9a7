"""The published contract, fast: /docs/openapi.json says what the API does.

The app in-process with a publisher that records (tests/test_api.py). Each
test checks one thing the schema claims against what the app really answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, get_args

import pytest
from litestar.testing import TestClient
from test_api import TOKEN, RecordingPublisher, caught_up, hardened_client, offline_app

import main
import tasks

Operation = tuple[str, str]  # (method, path) as the schema writes them


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    with TestClient(offline_app(RecordingPublisher())) as client:
        return client.get("/docs/openapi.json").json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def guarded_schema() -> dict[str, Any]:
    with hardened_client(api_token=TOKEN) as client:
        return client.get("/docs/openapi.json").json()  # type: ignore[no-any-return]


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


def operations(schema: dict[str, Any]) -> dict[Operation, dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, item in schema["paths"].items()
        for method, operation in item.items()
    }


def component(schema: dict[str, Any], reference: dict[str, str]) -> dict[str, Any]:
    return schema["components"]["schemas"][reference["$ref"].rsplit("/", 1)[1]]  # type: ignore[no-any-return]


def request_body(schema: dict[str, Any], operation: dict[str, Any]) -> dict[str, Any]:
    return component(schema, operation["requestBody"]["content"]["application/json"]["schema"])


def concrete(path: str) -> str:
    return path.replace("{task_id}", main.EXAMPLE_ID)


# -- Bodies -----------------------------------------------------------------------------


def test_the_task_body_is_a_bounded_integer_of_seconds(schema: dict[str, Any]) -> None:
    body = request_body(schema, schema["paths"]["/tasks"]["post"])

    assert body["properties"] == {"seconds": {"type": "integer", "minimum": 1, "maximum": 300, "examples": [5]}}
    assert body["required"] == ["seconds"]


@pytest.mark.parametrize("name", sorted(tasks.jobs))
def test_each_job_has_a_route_whose_body_is_its_arguments(schema: dict[str, Any], name: str) -> None:
    operation = schema["paths"][f"/jobs/{name}"]["post"]
    arguments = tasks.jobs[name].arguments

    assert operation["operationId"] == f"start_{name}"
    body = request_body(schema, operation)
    assert sorted(body["properties"]) == sorted(arguments.__struct_fields__)
    assert body["required"] == sorted(arguments.__struct_fields__)


def test_the_countdown_job_keeps_the_bounds_of_its_seconds(schema: dict[str, Any]) -> None:
    body = request_body(schema, schema["paths"]["/jobs/countdown"]["post"])

    assert body["properties"]["seconds"] == {"type": "integer", "minimum": 1, "maximum": 300}


def test_every_body_says_that_unknown_fields_are_refused(schema: dict[str, Any]) -> None:
    bodies = [request_body(schema, op) for op in operations(schema).values() if "requestBody" in op]

    assert len(bodies) == 1 + len(tasks.jobs)
    assert all(body["additionalProperties"] is False for body in bodies)


def test_an_unknown_job_is_a_404_before_its_body_is_read(client: TestClient[Any]) -> None:
    response = client.post("/jobs/send_report", content=b"not json", headers={"Content-Type": "text/plain"})

    assert response.status_code == 404
    assert response.json()["detail"] == "no job 'send_report'; the jobs are countdown, tally"


def test_the_schema_says_integers_are_written_without_a_fraction(schema: dict[str, Any]) -> None:
    assert schema["openapi"] == "3.1.0"  # whose `integer` is a JSON number without a fraction or exponent
    assert '`5`, never `5.0`, `5e0` or\n`"5"`, each a 400' in schema["info"]["description"]


# -- The event stream -------------------------------------------------------------------


def test_the_event_stream_is_text_of_task_changes(schema: dict[str, Any]) -> None:
    answer = schema["paths"]["/tasks/{task_id}/events"]["get"]["responses"]["200"]

    [(media_type, content)] = answer["content"].items()
    assert media_type == "text/event-stream"
    text, change = content["schema"]["oneOf"]
    assert text == {"type": "string"}
    event = component(schema, change)
    assert event["properties"]["event"]["enum"] == list(get_args(main.TaskStatus))
    assert event["properties"]["data"]["contentSchema"] == {"$ref": "#/components/schemas/TaskView"}


# -- Authentication -----------------------------------------------------------------------


def test_without_a_token_nothing_asks_for_one(schema: dict[str, Any]) -> None:
    assert "securitySchemes" not in schema["components"]
    for operation in operations(schema).values():
        assert "security" not in operation
        assert "401" not in operation["responses"]


def test_with_a_token_the_schema_declares_a_bearer_scheme(guarded_schema: dict[str, Any]) -> None:
    assert guarded_schema["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer", "description": "API_TOKEN, when it is set."}
    }


def test_with_a_token_exactly_the_routes_that_refuse_a_stranger_ask_for_it(guarded_schema: dict[str, Any]) -> None:
    refused, asking = set(), set()
    with hardened_client(api_token=TOKEN) as client:
        for (method, path), operation in operations(guarded_schema).items():
            if client.request(method, concrete(path)).status_code == 401:
                refused.add((method, path))
            if operation.get("security") == [{"bearer": []}] and "401" in operation["responses"]:
                asking.add((method, path))

    assert refused == asking
    assert ("POST", "/tasks") in asking
    assert ("GET", "/healthz") not in asking


def test_a_401_documents_www_authenticate(guarded_schema: dict[str, Any]) -> None:
    unauthorized = [op["responses"]["401"] for op in operations(guarded_schema).values() if "401" in op["responses"]]

    assert unauthorized
    assert all("WWW-Authenticate" in answer["headers"] for answer in unauthorized)


# -- Errors -----------------------------------------------------------------------------


def test_every_error_is_documented_as_problem_details(guarded_schema: dict[str, Any]) -> None:
    for operation in operations(guarded_schema).values():
        for status, answer in operation["responses"].items():
            if int(status) >= 400:
                [(media_type, content)] = answer["content"].items()
                assert (media_type, content["schema"]) == (
                    "application/problem+json",
                    {"$ref": "#/components/schemas/Problem"},
                ), (operation["operationId"], status)


def test_429_and_503_answers_document_retry_after(schema: dict[str, Any]) -> None:
    for operation in operations(schema).values():
        for status in ("429", "503"):
            if status in operation["responses"]:
                assert "Retry-After" in operation["responses"][status]["headers"]


def test_a_202_that_starts_a_task_documents_its_location(schema: dict[str, Any]) -> None:
    starts = [op for (method, path), op in operations(schema).items() if method == "POST"]

    assert len(starts) == 1 + len(tasks.jobs)
    for operation in starts:
        assert operation["responses"]["202"]["headers"]["Location"]["required"] is True


def send_twice(op: Operation) -> int:
    """The status of a second request, with a rate limit of one write a minute."""
    method, path = op
    body = {"seconds": 1} if path in ("/tasks", "/jobs/countdown") else {"title": "t", "words": []}
    with hardened_client(rate_limit_per_minute=1) as client:
        for _ in range(2):
            answer = client.request(method, concrete(path), json=body if method == "POST" else None)
    return answer.status_code


RATE_LIMIT = "More than RATE_LIMIT_PER_MINUTE"


def test_the_rate_limit_is_documented_on_exactly_the_routes_it_counts(schema: dict[str, Any]) -> None:
    limited = {op for op in operations(schema) if send_twice(op) == 429}
    documented = {
        op
        for op, operation in operations(schema).items()
        if operation["responses"].get("429", {}).get("description", "").startswith(RATE_LIMIT)
    }

    assert limited == documented
    assert ("DELETE", "/tasks/{task_id}") in documented


def test_the_rate_limit_headers_sent_are_documented_on_every_limited_answer(schema: dict[str, Any]) -> None:
    with hardened_client(rate_limit_per_minute=1) as limited_client:
        sent = {
            name for name in limited_client.post("/tasks", json={"seconds": 1}).headers if name.startswith("ratelimit-")
        }
    limited = [
        operation
        for operation in operations(schema).values()
        if operation["responses"].get("429", {}).get("description", "").startswith(RATE_LIMIT)
    ]

    assert len(sent) == 4
    for operation in limited:
        for status, answer in operation["responses"].items():
            if status.startswith("2") or status == "429":
                assert sent <= {name.lower() for name in answer["headers"]}


def cancel_a_finished_task(client: TestClient[Any], feed: main.EventsFeed) -> Any:
    feed.board.apply(tasks.TaskEvent(main.EXAMPLE_ID, "succeeded", time.time(), "countdown", 1))
    return client.delete(f"/tasks/{main.EXAMPLE_ID}")


def over_the_limit(method: str, path: str, **request: Any) -> Any:
    with hardened_client(rate_limit_per_minute=1) as client:
        client.request(method, path, **request)
        return client.request(method, path, **request)


def without_the_token(method: str, path: str) -> Any:
    with hardened_client(api_token=TOKEN) as client:
        return client.request(method, path)


TEXT: dict[str, Any] = {"content": b"{}", "headers": {"Content-Type": "text/plain"}}
TOO_LARGE: dict[str, Any] = {
    "content": b" " * (tasks.settings.max_body_bytes + 1),
    "headers": {"Content-Type": "application/json"},
}
Send = Callable[[TestClient[Any], main.EventsFeed], Any]
# How to make each documented problem happen, in-process.
EXAMPLES: dict[tuple[str, str], Send] = {
    ("create_task", "400"): lambda c, _: c.post("/tasks", json={"seconds": "3"}),
    ("start_countdown", "400"): lambda c, _: c.post("/jobs/countdown", json=[]),
    ("start_tally", "400"): lambda c, _: c.post("/jobs/tally", json=[]),
    ("list_tasks", "400"): lambda c, _: c.get("/tasks?limit=0"),
    ("get_task", "404"): lambda c, _: c.get(f"/tasks/{main.EXAMPLE_ID}"),
    ("cancel_task", "404"): lambda c, _: c.delete(f"/tasks/{main.EXAMPLE_ID}"),
    ("task_events", "404"): lambda c, _: c.get(f"/tasks/{main.EXAMPLE_ID}/events"),
    ("cancel_task", "409"): cancel_a_finished_task,
    ("create_task", "413"): lambda c, _: c.post("/tasks", **TOO_LARGE),
    ("start_countdown", "413"): lambda c, _: c.post("/jobs/countdown", **TOO_LARGE),
    ("start_tally", "413"): lambda c, _: c.post("/jobs/tally", **TOO_LARGE),
    ("create_task", "415"): lambda c, _: c.post("/tasks", **TEXT),
    ("start_countdown", "415"): lambda c, _: c.post("/jobs/countdown", **TEXT),
    ("start_tally", "415"): lambda c, _: c.post("/jobs/tally", **TEXT),
    ("create_task", "429"): lambda *_: over_the_limit("POST", "/tasks", json={"seconds": 1}),
    ("start_countdown", "429"): lambda *_: over_the_limit("POST", "/jobs/countdown", json={"seconds": 1}),
    ("start_tally", "429"): lambda *_: over_the_limit("POST", "/jobs/tally", json={"title": "t", "words": []}),
    ("cancel_task", "429"): lambda *_: over_the_limit("DELETE", f"/tasks/{main.EXAMPLE_ID}"),
    **{
        (operation_id, "401"): lambda *_, method=method, path=path: without_the_token(method, path)
        for operation_id, method, path in [
            ("create_task", "POST", "/tasks"),
            ("list_tasks", "GET", "/tasks"),
            ("start_countdown", "POST", "/jobs/countdown"),
            ("start_tally", "POST", "/jobs/tally"),
            ("get_task", "GET", "/tasks/x"),
            ("cancel_task", "DELETE", "/tasks/x"),
            ("task_events", "GET", "/tasks/x/events"),
            ("list_schedules", "GET", "/schedules"),
        ]
    },
}
# Made by the code that sends them, and seen on a real stack elsewhere: the
# broker's 503s (tests/test_client.py), the slow body (tests/test_hostile.py,
# status only) and the stream limits (StreamSlots' own sentences).
ELSEWHERE = {
    *((op, "503") for op in ("create_task", "start_countdown", "start_tally", "cancel_task", "readyz")),
    *((op, "408") for op in ("create_task", "start_countdown", "start_tally")),
    ("task_events", "429"),
    ("task_events", "503"),
}


def documented_examples(schema: dict[str, Any]) -> dict[tuple[str, str], Any]:
    return {
        (operation["operationId"], status): example["value"]
        for operation in operations(schema).values()
        for status, answer in operation["responses"].items()
        if int(status) >= 400
        for example in answer["content"]["application/problem+json"]["examples"].values()
    }


@pytest.mark.parametrize("answer", sorted(EXAMPLES), ids="-".join)
def test_a_documented_problem_is_what_the_api_sends(
    guarded_schema: dict[str, Any], client: TestClient[Any], feed: main.EventsFeed, answer: tuple[str, str]
) -> None:
    response = EXAMPLES[answer](client, feed)

    assert (response.status_code, response.json()) == (int(answer[1]), documented_examples(guarded_schema)[answer])


def test_every_documented_problem_is_checked(guarded_schema: dict[str, Any]) -> None:
    assert set(documented_examples(guarded_schema)) == set(EXAMPLES) | ELSEWHERE


# -- Methods ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/tasks", "/tasks/{task_id}", "/tasks/{task_id}/events", "/jobs/tally"])
def test_options_lists_every_method_of_the_path(schema: dict[str, Any], client: TestClient[Any], path: str) -> None:
    response = client.options(concrete(path))

    assert response.status_code == 204
    assert set(response.headers["allow"].split(", ")) == {*map(str.upper, schema["paths"][path]), "OPTIONS"}


@pytest.mark.parametrize("path", ["/tasks", "/tasks/{task_id}"])
def test_a_405_lists_every_method_of_the_path(schema: dict[str, Any], client: TestClient[Any], path: str) -> None:
    response = client.put(concrete(path))

    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) == {*map(str.upper, schema["paths"][path]), "OPTIONS"}


def test_options_needs_no_token() -> None:
    with hardened_client(api_token=TOKEN) as client:
        assert client.options("/tasks").status_code == 204


def test_every_body_is_required_json(schema: dict[str, Any]) -> None:
    for operation in operations(schema).values():
        if "requestBody" in operation:
            assert list(operation["requestBody"]["content"]) == ["application/json"]
            assert operation["requestBody"]["required"] is True
