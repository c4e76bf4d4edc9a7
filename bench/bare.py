"""The web ceiling: Litestar on granian (uvloop), no broker.

POST /tasks decodes the body strictly, as onebox does, and answers 202 at
once; whatever onebox is slower than this, its publishing costs.

    python -m granian bare:app --interface asgi --loop uvloop (from bench/)
"""

from __future__ import annotations

import uuid

import msgspec
from litestar import Litestar, post


class TaskRequest(msgspec.Struct, forbid_unknown_fields=True):
    seconds: int


class TaskAccepted(msgspec.Struct):
    id: str
    seconds: int
    status: str


@post("/tasks", status_code=202)
async def create_task(data: TaskRequest) -> TaskAccepted:
    return TaskAccepted(id=str(uuid.uuid4()), seconds=data.seconds, status="queued")


app = Litestar([create_task])
