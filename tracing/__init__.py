"""hopscope.tracing: record requests as traces, without the app noticing.

No UI and no HTTP client here: this package runs inside users' apps.
"""

from .context import span
from .model import Event, Span, Trace, TraceBuilder
from .sinks import FileSink, MemorySink, Sink, SocketSink
from .tracefile import TraceFileError, load
from .wrap import wrap

__all__ = [
    "Event",
    "FileSink",
    "MemorySink",
    "Sink",
    "SocketSink",
    "Span",
    "Trace",
    "TraceBuilder",
    "TraceFileError",
    "load",
    "span",
    "wrap",
]
