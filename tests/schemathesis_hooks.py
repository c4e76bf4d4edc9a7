"""Schemathesis hooks for the fuzz run (tests/test_hostile.py): integers written as
integers, and `at` instants inside the window onebox takes.

The schema declares OpenAPI 3.1.0, which defines `integer` as a JSON number
without a fraction or exponent part, and its description says that onebox
refuses `5.0` for an integer. Schemathesis reads `integer` by JSON Schema
2020-12 instead, where `5.0` is one, and sends it as a schema-valid value.
Here it writes whole numbers as a conforming client does: `5.0` becomes `5`.
A value the schema refuses stays refused (`301.0` becomes `301`, still over
the maximum; `5.0` for a string becomes `5`, still not a string).

`at` is an instant "in the future and at most 7 days ahead", as its
description says: a window that moves with the clock, which a JSON schema
cannot state. An `at` the schema takes (a date-time with its offset) is moved
into that window, as a conforming client's would be; one the schema refuses
stays refused. With `delay` beside it (the description: "Not with `at`"),
a conforming client sends `delay` alone.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import schemathesis


def whole_numbers_as_integers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: whole_numbers_as_integers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [whole_numbers_as_integers(item) for item in value]
    return value


@schemathesis.hook
def map_body(_: schemathesis.HookContext, body: Any) -> Any:
    return whole_numbers_as_integers(body)


def a_date_time(value: Any) -> bool:
    try:
        return isinstance(value, str) and len(value) <= 64 and datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


@schemathesis.hook
def map_case(_: schemathesis.HookContext, case: schemathesis.Case[Any]) -> schemathesis.Case[Any]:
    query = case.query
    if query and a_date_time(query.get("at")):
        if "delay" in query:
            del query["at"]
        else:
            query["at"] = (datetime.now(UTC) + timedelta(hours=1)).isoformat(timespec="seconds")
    return case
