"""The comparison stack, as tutorials ship it: FastAPI on uvicorn with a
plain sync handler calling ``actor.send()`` on a stock RabbitmqBroker (no
publisher confirms), and ``dramatiq app`` with its default processes and
threads. The actor logs as onebox's does, so that pickup is measured alike.

    uvicorn app:app --workers 1    and    dramatiq app    (from bench/plain/)
"""

from __future__ import annotations

import logging
import os
import time

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import CurrentMessage
from fastapi import FastAPI
from pydantic import BaseModel

broker = RabbitmqBroker(url=os.environ.get("CLOUDAMQP_URL", "amqp://guest:guest@localhost:5672/"))
broker.add_middleware(CurrentMessage())
dramatiq.set_broker(broker)
logger = logging.getLogger("plain")


@dramatiq.actor(queue_name=os.environ.get("QUEUE_NAME", "default"))
def countdown(seconds: int) -> None:
    message = CurrentMessage.get_current_message()
    task_id = message.message_id if message else "?"
    logger.info("task %s started seconds=%d", task_id, seconds)
    for remaining in range(seconds - 1, -1, -1):
        time.sleep(1)
        logger.info("task %s remaining=%d", task_id, remaining)
    logger.info("task %s done seconds=%d", task_id, seconds)


class Task(BaseModel):
    seconds: int


class Accepted(BaseModel):
    id: str


app = FastAPI()


@app.post("/tasks", status_code=202)
def create_task(task: Task) -> Accepted:
    message = countdown.send(task.seconds)
    return Accepted(id=message.message_id)
