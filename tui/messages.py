"""Messages that cross widgets (each named after what happened)."""

from __future__ import annotations

from textual.message import Message

__all__ = ["FollowRequested", "RequestSelected"]


class RequestSelected(Message):
    """The user chose a request in the list (keys or a click)."""

    def __init__(self, trace_id: str) -> None:
        self.trace_id = trace_id
        super().__init__()


class FollowRequested(Message):
    """The user asked to see the newest requests again (clicked the "N new" marker)."""
