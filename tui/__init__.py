"""hopscope.tui: the live terminal UI (Textual).

``HopscopeApp(source)`` shows requests as an :class:`EventSource` delivers their wire
events: :class:`QueueSource` for anything that can push events (the collector, tests),
:class:`FileSource` to replay a trace file.  Nothing here imports ``hopscope.app``.
"""

from .app import HopscopeApp
from .source import EventSource, FileSource, QueueSource

__all__ = ["EventSource", "FileSource", "HopscopeApp", "QueueSource"]
