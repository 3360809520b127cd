"""A small SSE parser for the tests: the bytes a client receives, turned into events."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Event:
    id: str | None
    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


def parse_events(raw: str) -> list[Event]:
    """Split a text/event-stream body into events; comments (`: ping`) are dropped."""
    events = []
    for block in raw.split("\n\n"):
        fields: dict[str, list[str]] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value.removeprefix(" "))
        if "data" in fields:
            event_id = fields.get("id", [None])[-1]
            events.append(Event(event_id, fields.get("event", ["message"])[-1], "\n".join(fields["data"])))
    return events


def text_of(events: list[Event]) -> str:
    return "".join(e.json()["text"] for e in events if e.event == "message")
