"""The process ``hopscope run TARGET`` starts: the user's app, instrumented, under a real server.

ASGI apps run under uvicorn with hopscope's protocol class (the server hop).  WSGI apps
run under gunicorn's ``gthread`` worker with hopscope's request hooks, not through
uvicorn's deprecated WSGI adapter or a thread-pool bridge: the app then gets the environ,
threads, keep-alive and ``sendfile`` of a server people deploy, and the server hop comes
from gunicorn's own hooks.

The parent binds the listening socket and hands it down by file descriptor, so a port in
use is reported before this process starts, and no other process can take the port in
between.  Once the server accepts connections, one line on ``--ready-fd`` says what runs
(``asgi uvicorn``): the parent then prints the URL.  Started as
``python -P -m hopscope.app.serve``: only ``--app-dir`` is put on ``sys.path``, as uvicorn
does, and nothing here imports a module the user could shadow (``tracing``, ``app``).

Ctrl+C before the server runs (while hopscope or the app still imports) ends this process
quietly with the status of an interrupt, as the servers do once they run: hence the
imports of hopscope inside the functions, under :func:`main`'s ``except``.

Under ``hopscope run --reload`` the processes started after a change get
``--brief-errors``: an app that fails to load (a syntax error half-way through an edit)
is then one line on ``--ready-fd`` (``failed app.py:7: SyntaxError: ...``), which the
parent says before it waits for the next change, instead of a traceback per save; a
module that does not exist at all is ``missing REASON`` instead (at the first start, a
typo in TARGET: the parent ends the run rather than wait for a file no edit makes).  And
every process gets ``--hand-over``: the listening socket outlives it (the parent keeps
it for the next one), so on SIGTERM what uvicorn accepted just before it stopped
accepting is served rather than closed unread (see :data:`HAND_OVER_GRACE`).
"""

from __future__ import annotations

import sys

try:  # Ctrl+C while this process starts: quietly, as in main (see above)
    import argparse
    import contextlib
    import importlib
    import inspect
    import os
    import socket
    import traceback
    from collections.abc import Callable
    from typing import Any
except KeyboardInterrupt:
    sys.exit(130)

__all__ = ["ServeError", "load_target", "main"]

#: gunicorn gthread threads: requests a WSGI app serves at once.
WSGI_THREADS = 8
#: Exit status when the app cannot be loaded (uvicorn's and gunicorn's use 1 and 3 alike).
LOAD_FAILED = 1
#: Exit status after Ctrl+C before the server ran (a shell's for SIGINT).
INTERRUPTED = 130
#: Seconds uvicorn, under ``--hand-over``, waits between closing its listening socket and
#: closing its idle connections: a connection it accepted in its last moments, whose
#: request was not read yet, counts as idle, and closing it loses a request the next
#: process would have answered (the proxy retries only on a kept-alive connection).
HAND_OVER_GRACE = 0.1


class ServeError(Exception):
    """The app cannot be served; the message is one line."""


class ModuleMissing(ServeError):
    """TARGET's module does not exist (not an import inside it that fails)."""


def load_target(target: str, factory: bool = False) -> Any:
    """Import ``module:attribute`` (the attribute may be dotted); call it if ``factory``."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ServeError(f"expected TARGET as module:attribute (e.g. main:app), got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only the module itself missing is the user's typo; a missing import inside it
        # is their app's error, with its traceback.
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            raise ModuleMissing(
                f"cannot import {module_name!r}: no module named {exc.name!r} "
                f"(looked in {sys.path[0]} and the installed packages; see --app-dir)"
            ) from None
        raise
    app: Any = module
    for part in attribute.split("."):
        try:
            app = getattr(app, part)
        except AttributeError:
            raise ServeError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if factory:
        if not callable(app):
            raise ServeError(f"{target} is not callable, so it cannot be an app factory")
        if _needs_arguments(app):
            raise ServeError(
                f"{target} takes arguments, so it cannot be an app factory "
                "(if it is the app, drop --factory)"
            )
        app = app()
    if not callable(app):
        raise ServeError(f"{target} is not an ASGI or WSGI app (a {type(app).__name__})")
    if not factory and _looks_like_factory(app):
        raise ServeError(f"{target} takes no arguments: if it makes the app, add --factory")
    return app


def _needs_arguments(app: Any) -> bool:
    """Whether calling ``app`` with no arguments fails before it runs (the app itself
    given with ``--factory``), told apart from a factory's own TypeError."""
    try:
        inspect.signature(app).bind()
    except TypeError:
        return True
    except ValueError:  # no signature to read: let the call decide
        return False
    return False


def _looks_like_factory(app: Any) -> bool:
    from hopscope.tracing.wrap import is_asgi

    if not inspect.isfunction(app) or is_asgi(app):
        return False
    try:
        return not inspect.signature(app).parameters
    except (TypeError, ValueError):
        return False


def _traced(app: Any) -> Any:
    """``app`` wrapped, unless the user's code wraps it already (maybe under middleware
    of their own, or Flask's ``wsgi_app``): each request recorded once."""
    from hopscope.tracing.wrap import is_traced, wrap

    return app if is_traced(app) else wrap(app)


def _load_error(exc: BaseException) -> str:
    """What stopped the app from loading, in one line: where (the innermost frame in the
    app's folder, else the innermost one) and the exception, as ``file:line: Type: text``."""
    if isinstance(exc, ServeError):
        return str(exc)
    text = " ".join(str(exc.msg if isinstance(exc, SyntaxError) else exc).split())
    what = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    where: tuple[str, int | None] | None = None
    if isinstance(exc, SyntaxError) and exc.filename:
        where = (exc.filename, exc.lineno)
    else:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename[:1] != "<"]
        home = sys.path[0] + os.sep
        mine = [f for f in frames if os.path.abspath(f.filename).startswith(home)]
        if mine or frames:
            frame = (mine or frames)[-1]
            where = (frame.filename, frame.lineno)
    if where is None:
        return what
    path = os.path.abspath(where[0])
    with contextlib.suppress(ValueError):  # (another drive)
        relative = os.path.relpath(path)
        if not relative.startswith(os.pardir + os.sep):
            path = relative
    return f"{path}:{where[1]}: {what}" if where[1] else f"{path}: {what}"


def _ready_writer(fd: int | None) -> Callable[[str], None]:
    """Says once on ``fd`` that the server is up, then closes it (workers forked later
    must not hold the pipe open)."""
    state = {"fd": fd}

    def ready(what: str) -> None:
        fd = state["fd"]
        if fd is None:
            return
        state["fd"] = None
        try:
            os.write(fd, what.encode() + b"\n")
        except OSError:
            pass
        finally:
            os.close(fd)

    return ready


def serve_asgi(
    app: Any,
    sock: socket.socket,
    ready: Callable[[str], None],
    hand_over: bool = False,
    ws: str = "auto",
) -> int:
    import asyncio

    import uvicorn
    from hopscope.tracing.servers.uvicorn_protocols import HttpToolsProtocol
    from hopscope.tracing.servers.uvicorn_ws import ws_protocol

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                ready("asgi uvicorn")

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            if hand_over and not self.force_exit:
                for server in self.servers:
                    server.close()  # no more accepts: the backlog is the next process's
                await asyncio.sleep(HAND_OVER_GRACE)  # (the last ones read their request)
            await super().shutdown(sockets=sockets)

    try:  # uvicorn's --ws setting, its class with the server hop
        ws_class = ws_protocol(ws)
    except ImportError as exc:  # (wsproto, websockets: not installed)
        need = f"the {exc.name} package (pip install {exc.name})" if exc.name else str(exc)
        raise ServeError(f"--ws {ws} needs {need}") from None
    config = uvicorn.Config(
        _traced(app),
        http=HttpToolsProtocol,
        ws=ws_class or "none",
        log_level="warning",
        access_log=False,
    )
    server = Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, as its CLI expects
        pass
    return 0 if server.started else 3  # uvicorn's own status when start-up failed


def serve_wsgi(app: Any, fd: int, ready: Callable[[str], None]) -> int:
    try:
        from gunicorn.app.base import BaseApplication
    except ImportError:
        raise ServeError(
            "serving a WSGI app needs gunicorn (pip install gunicorn); "
            "ASGI apps are served by uvicorn"
        ) from None
    from hopscope.tracing.servers.gunicorn_hooks import close_span, open_span

    def pre_request(worker: Any, req: Any) -> None:
        try:
            open_span(worker, req)
        except Exception as exc:  # a failing pre_request would fail the request
            print(f"hopscope: cannot record the server hop: {exc}", file=sys.stderr)

    def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
        close_span(req, resp)

    def when_ready(arbiter: Any) -> None:
        ready("wsgi gunicorn")

    settings: dict[str, Any] = {
        "bind": [f"fd://{fd}"],
        "workers": 1,
        "worker_class": "gthread",
        "threads": WSGI_THREADS,
        "loglevel": "warning",
        "accesslog": None,
        "proc_name": "hopscope-run",
        "pre_request": pre_request,
        "post_request": post_request,
        "when_ready": when_ready,
    }
    wrapped = _traced(app)

    class Application(BaseApplication):  # type: ignore[misc]
        """gunicorn with these settings only: no ``gunicorn.conf.py``, no command line."""

        def load_config(self) -> None:
            for name, value in settings.items():
                self.cfg.set(name, value)
            if "control_socket_disable" in self.cfg.settings:  # gunicorn >= 25.1
                # Its ~/.gunicorn/gunicorn.ctl would replace that of a gunicorn the user
                # runs, and be removed at exit: this server is no one's to manage.
                self.cfg.set("control_socket_disable", True)

        def load(self) -> Any:
            return wrapped

    Application().run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hopscope.app.serve")
    parser.add_argument("target", help="module:attribute")
    parser.add_argument("--fd", type=int, required=True, help="a listening socket to serve on")
    parser.add_argument("--ready-fd", type=int, help="a pipe to say 'ready' on")
    parser.add_argument("--app-dir", default=".", help="where to import the module from")
    parser.add_argument("--factory", action="store_true", help="TARGET makes the app")
    parser.add_argument(
        "--brief-errors",
        action="store_true",
        help="an app that fails to load is one line on --ready-fd ('failed REASON', or "
        "'missing REASON': no such module)",
    )
    parser.add_argument("--ws", default="auto", help="uvicorn's --ws (ASGI apps)")
    parser.add_argument(
        "--hand-over",
        action="store_true",
        help="another process serves the socket next: serve what was accepted",
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.app_dir))
    ready = _ready_writer(args.ready_fd)
    try:
        from hopscope.tracing.inject import ROUTE_PATCHES, install
        from hopscope.tracing.wrap import is_asgi

        install(ROUTE_PATCHES)  # the routes Quart, Django, Falcon, Sanic, Pyramid keep
        try:
            app = load_target(args.target, args.factory)
        except Exception as exc:
            if not args.brief_errors:
                raise
            said = "missing " if isinstance(exc, ModuleMissing) else "failed "
            ready(said + _load_error(exc))
            return LOAD_FAILED
        if is_asgi(app):
            sock = socket.socket(fileno=args.fd)
            return serve_asgi(app, sock, ready, args.hand_over, args.ws)
        if args.ws not in ("auto", "none"):
            raise ServeError(
                f"--ws {args.ws} applies to ASGI apps (uvicorn): {args.target} is a WSGI "
                "app, served by gunicorn, which has no WebSockets"
            )
        return serve_wsgi(app, args.fd, ready)
    except ServeError as exc:
        print(f"hopscope: {exc}", file=sys.stderr)
        return LOAD_FAILED
    except KeyboardInterrupt:
        return INTERRUPTED


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # (before main's own try: parsing its arguments)
        sys.exit(INTERRUPTED)
