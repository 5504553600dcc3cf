"""Hooks inside application servers: the ``server`` hop of a trace.

Each module here runs inside a server process (uvicorn, gunicorn) and records the
server's own moments around the app span, which joins them through the
``hopscope`` scope key (ASGI) or :data:`hopscope.tracing.context.server_parent` (WSGI).
"""
