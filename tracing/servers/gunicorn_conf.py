"""gunicorn server hooks: the ``server`` hop for sync, gthread and gunicorn's ASGI workers.

Use as ``gunicorn -c python:hopscope.tracing.servers.gunicorn_conf app:app``.  A ``-c``
replaces ``./gunicorn.conf.py`` entirely, so this module first loads the user's config
(``HOPSCOPE_GUNICORN_CONFIG``, else ``./gunicorn.conf.py`` when present), copies its
settings, and calls the user's ``pre_request``/``post_request`` from its own.

``pre_request`` fires after the request head is parsed, before the environ is built;
``post_request`` after the response was written.  Both run on the worker thread that
handles the request (in the ASGI worker: in the task that then calls the app), which is
how the app span finds its parent (:data:`hopscope.tracing.context.server_parent`).
uvicorn's workers call neither: under
them, the uvicorn protocol classes record the server hop.
"""

from __future__ import annotations

import os
import runpy
from collections.abc import Callable
from typing import Any

from .gunicorn_hooks import close_span, open_span

_user_hooks: dict[str, Callable[..., Any]] = {}


def _load_user_config() -> dict[str, Any]:
    path = os.environ.get("HOPSCOPE_GUNICORN_CONFIG") or (
        "gunicorn.conf.py" if os.path.exists("gunicorn.conf.py") else ""
    )
    if not path:
        return {}
    if path.startswith("python:"):
        module = __import__(path[7:], fromlist=["_"])
        return {k: getattr(module, k) for k in dir(module) if not k.startswith("_")}
    return {k: v for k, v in runpy.run_path(path).items() if not k.startswith("_")}


def _install_user_config() -> None:
    namespace = globals()
    for name, value in _load_user_config().items():
        if name in ("pre_request", "post_request") and callable(value):
            _user_hooks[name] = value
        elif name not in namespace or name in ("bind", "workers", "worker_class", "threads"):
            namespace[name] = value


def pre_request(worker: Any, req: Any) -> None:
    try:
        open_span(worker, req)
    finally:
        hook = _user_hooks.get("pre_request")
        if hook is not None:
            hook(worker, req)


def post_request(worker: Any, req: Any, environ: Any = None, resp: Any = None) -> None:
    try:
        close_span(req, resp)
    finally:
        hook = _user_hooks.get("post_request")
        if hook is not None:
            hook(worker, req, environ, resp)


_install_user_config()
