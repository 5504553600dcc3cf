"""Zero-code instrumentation: what ``hopscope run -- COMMAND`` puts into a server.

The bootstrap ``sitecustomize`` (``hopscope/app/bootstrap``) calls :func:`install` when a
process of the command first imports a server or framework: a forking server's workers
inherit the hooks, and spawned workers (uvicorn ``--workers``, hypercorn) run the
bootstrap again, because its folder stays on their ``PYTHONPATH``.  :func:`install` adds
an import hook that patches a module right after it first runs: a dictionary lookup per
import, and nothing is imported that the program would not import itself.

Two kinds of wrap points, as checked in the server-hooks notes:

* The server's: where a server gets the app it will call (uvicorn ``Config.load``,
  gunicorn ``WSGIApplication.load_wsgiapp``, hypercorn ``utils.wrap_app``, Werkzeug
  ``run_simple``, gevent's ``WSGIHandler`` per request, waitress ``create_server``,
  cheroot's WSGI ``Server``, mod_wsgi-express's ``ApplicationHandler``), and Werkzeug's test
  ``run_wsgi_app`` (its ``Client``'s, for plain Werkzeug apps).  The app is wrapped with
  :func:`hopscope.tracing.wrap`, unless the user's code wraps it already,
  maybe under middleware of their own (:func:`hopscope.tracing.wrap.is_traced`), and the
  server hop is added where the server allows it: hopscope's uvicorn protocol classes,
  gunicorn's request hooks (chained to the user's, never replacing them), gevent's
  ``handle_one_response`` (gunicorn's ``-k gevent_pywsgi`` runs no request hooks),
  mod_wsgi's own time stamps in the environ (:mod:`hopscope.tracing.servers.mod_wsgi`).
  uWSGI takes the callable from C: the module its options name is patched once it has
  run (``--module``), or the file it runs is watched to its return (``--wsgi-file``).
* The framework's, for servers without a hook (Django's ``runserver``,
  granian, daphne, uWSGI for framework apps) and test clients that call the app directly:
  ``Flask.__call__``, Django's ``WSGIHandler``/``ASGIHandler`` (and its test clients'
  ``ClientHandler`` and ``AsyncClientHandler``), ``Starlette.__call__``
  (FastAPI's ends in Starlette's) and ``Quart.__call__``; likewise Litestar's, Falcon's
  (WSGI and ASGI), Sanic's ASGI app, Bottle's (also run as ``python -m bottle``:
  :meth:`_PatchingFinder._watch_main`) and Pyramid's ``Router``.  Sanic's own
  server calls none of them: starting it says so.  They record only when no
  server wrap point fired in the process and no hopscope span is current, so they never
  add a second app span.
  Patching the handler's call rather than ``get_wsgi_application`` is why: under
  gunicorn, a project that wraps Django's app in its own middleware (WhiteNoise) still
  gets one app span, not two.  Their callers get the app's own result back
  (:class:`_Result`): Django's handler returns the ``HttpResponse``, and code that calls
  it directly uses more of it than a server does.

Quart, Django, Falcon, Sanic and Pyramid keep the route they matched on their request
objects, which the middlewares do not see: a hook where each has just matched it hands
it to the request's span (:func:`_note_route`; Falcon's WSGI app also hands over the
exception it answered 500 for, :func:`_note_error`); :data:`ROUTE_PATCHES` are these
alone, for ``hopscope run TARGET``, which wraps the app itself.  ``wrap(app)`` in code
installs none of them: there, these five frameworks' spans have no route.

Tracing never stops the program: a patch that fails says why on stderr in one line
starting with ``hopscope:``, once per ``hopscope run`` however many workers meet the same
failure (:func:`_first_to_say`), and the server runs as it would have.  This module runs inside
users' processes: it imports nothing beyond the standard library until a patched module
loads.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from contextvars import ContextVar
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

__all__ = ["PATCHES", "ROUTE_PATCHES", "install"]


#: The environment variable naming the folder where ``hopscope run`` notes what was said.
SAID_ENV = "HOPSCOPE_SAID"


def _first_to_say(message: str) -> bool:
    """Whether no other process of this ``hopscope run`` said ``message`` yet.

    Every worker of a server loads the app and meets the same failure: the user is told
    once, not once per worker (or per restart of a dying worker).  The first process to
    create the message's file in the folder ``hopscope run`` made (:data:`SAID_ENV`)
    says it; outside ``hopscope run``, or if that folder is gone, every process says it.
    """
    path = _said_path(message)
    if path is None:
        return True
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True
    return True


def _said_path(message: str) -> str | None:
    folder = os.environ.get(SAID_ENV)
    if not folder:
        return None
    import hashlib

    return os.path.join(folder, hashlib.sha256(message.encode(errors="replace")).hexdigest()[:32])


def _unsay(message: str) -> None:
    """Let ``message`` be said once more (see :func:`_patch_uvicorn_reload`)."""
    path = _said_path(message)
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass


def _say(message: str) -> None:
    if not _first_to_say(message):
        return
    try:
        # One write: workers saying things at once must not mix their lines.
        sys.stderr.write(f"hopscope: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):  # stderr closed (or None): nowhere to say it
        pass


def _stopped(exc: BaseException) -> bool:
    """Whether loading the app ended because the process was asked to stop (Ctrl+C, or a
    gunicorn worker told to quit exits 0), not because the app could not load."""
    return isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit) and not exc.code)


def _describe(app: Any) -> str:
    if isinstance(app, str):
        return repr(app)
    return f"the app ({type(app).__name__})"


#: Set once a server's own wrap point has wrapped an app in this process: the framework
#: patches then stand aside even where the request's context does not reach them (uvicorn
#: runs WSGI apps on executor threads that do not copy it).
_served = False


def _wrap(app: Any, what: str, mode: str | None = None) -> Any:
    """``app`` instrumented for a server (``mode`` forces ASGI or WSGI); unchanged if that
    fails."""
    global _served
    try:
        from .wrap import is_traced, wrap

        if is_traced(app):  # the user's own wrap() records its requests
            wrapped = app
        elif mode not in ("asgi", "wsgi"):
            wrapped = wrap(app)
        elif mode == "asgi":
            from .asgi import ASGIMiddleware

            wrapped = ASGIMiddleware(app)
        else:
            from .wsgi import WSGIMiddleware

            wrapped = WSGIMiddleware(app)
    except Exception as exc:
        _say(f"cannot trace {what}: {type(exc).__name__}: {exc}; serving it untraced")
        return app
    _served = True
    return wrapped


# -- uvicorn -----------------------------------------------------------------------------


#: uvicorn's adapters: what they wrap does not speak ASGI 3, so the span goes around them.
#: (Inside the WSGI adapter, the app runs on an executor thread that neither the scope
#: nor the context reaches: its span could not join the server span.)
_UVICORN_ADAPTERS = ("uvicorn.middleware.asgi2", "uvicorn.middleware.wsgi")


def _inside_uvicorn(app: Any) -> Any:
    """Wrap the app under uvicorn's own middlewares (proxy headers, message logger), so
    the app span sees the request as the app does, as ``wrap(app)`` would."""
    module = type(app).__module__
    inner = getattr(app, "app", None)
    if (
        module.startswith("uvicorn.middleware.")
        and module not in _UVICORN_ADAPTERS
        and inner is not None
    ):
        app.app = _inside_uvicorn(inner)
        return app
    return _wrap(app, "the app")


_UVICORN_PROTOCOLS = {
    "uvicorn.protocols.http.httptools_impl.HttpToolsProtocol": "HttpToolsProtocol",
    "uvicorn.protocols.http.h11_impl.H11Protocol": "H11Protocol",
    "uvicorn.protocols.http.zttp_impl.ZttpProtocol": "ZttpProtocol",
    "uvicorn.protocols.http.auto_zttp_impl.AutoZttpProtocol": "AutoZttpProtocol",  # --http2
}


def _uvicorn_protocol(setting: Any, chosen: Any) -> Any:
    """hopscope's subclass of the protocol uvicorn chose, unless the user chose a class."""
    if not isinstance(setting, str) or setting not in ("auto", "httptools", "h11", "zttp"):
        return chosen
    name = _UVICORN_PROTOCOLS.get(f"{chosen.__module__}.{chosen.__qualname__}")
    if name is None:
        return chosen
    from .servers import uvicorn_protocols

    return getattr(uvicorn_protocols, name)


def _uvicorn_ws_protocol(setting: Any, chosen: Any) -> Any:
    """hopscope's subclass of the WebSocket protocol uvicorn chose (``--ws``), unless the
    user chose a class of their own or none; uvicorn's own when it cannot be hooked."""
    if not isinstance(setting, str) or setting not in _UVICORN_WS or chosen is None:
        return chosen
    try:
        from .servers.uvicorn_ws import traced_ws_protocol

        return traced_ws_protocol(chosen)
    except Exception:  # (the app span is recorded all the same)
        return chosen


_UVICORN_WS = ("auto", "websockets", "websockets-sansio", "wsproto")


def _uvicorn_load_failure(config: Any) -> str:
    return f"uvicorn could not load {_describe(config.app)}: nothing to trace"


def _patch_uvicorn_reload(module: ModuleType) -> None:
    """A reload of ``uvicorn --reload`` (the user edited a file) may meet the same load
    failure as before: it is said again, as uvicorn says its traceback again.  Why here:
    the reloader's restart is the one place a reload is told apart from a worker
    restarted by ``--workers`` (said once a run: 31 times is noise), so the reloader
    forgets the line was said before it starts the new child."""
    base = module.BaseReload
    restart = base.restart

    @functools.wraps(restart)
    def patched_restart(self: Any) -> None:
        try:
            _unsay(_uvicorn_load_failure(self.config))
        except Exception:  # (tracing never stops the program)
            pass
        restart(self)

    base.restart = patched_restart


def _patch_uvicorn(module: ModuleType) -> None:
    config_class = module.Config
    load = config_class.load
    load_app = getattr(config_class, "load_app", None)  # uvicorn 0.54 imports the app early

    def failed(config: Any, exc: BaseException) -> None:
        if not _stopped(exc) and not config.__dict__.get("_hopscope_failed"):
            config.__dict__["_hopscope_failed"] = True
            _say(_uvicorn_load_failure(config))

    if load_app is not None:

        @functools.wraps(load_app)
        def patched_load_app(self: Any) -> Any:
            try:
                return load_app(self)
            except BaseException as exc:
                failed(self, exc)
                raise

        config_class.load_app = patched_load_app

    @functools.wraps(load)
    def patched_load(self: Any) -> None:
        try:
            load(self)
        except BaseException as exc:
            failed(self, exc)
            raise
        try:
            self.loaded_app = _inside_uvicorn(self.loaded_app)
            self.http_protocol_class = _uvicorn_protocol(self.http, self.http_protocol_class)
            self.ws_protocol_class = _uvicorn_ws_protocol(self.ws, self.ws_protocol_class)
        except Exception as exc:
            _say(f"cannot trace uvicorn's server hop: {type(exc).__name__}: {exc}")

    config_class.load = patched_load


# -- gunicorn ----------------------------------------------------------------------------


def _is_hopscope(hook: Any) -> bool:
    return bool(getattr(hook, "__hopscope_hook__", False)) or str(
        getattr(hook, "__module__", "")
    ).startswith("hopscope.")


def _add_gunicorn_hooks(cfg: Any) -> None:
    """Chain hopscope's server span to the hooks gunicorn already has (the user's or the
    no-op defaults); a config that is hopscope's own (``gunicorn_conf``) is left alone."""
    user_pre = cfg.pre_request
    user_post = cfg.post_request
    if _is_hopscope(user_pre) or _is_hopscope(user_post):
        return
    from .servers.gunicorn_hooks import close_span, open_span

    report = _reporter("gunicorn's server hop")

    # Exactly these arities: gunicorn checks them.
    def pre_request(worker: Any, req: Any) -> None:
        try:
            open_span(worker, req)
        except Exception as exc:  # a failing pre_request would fail the request
            report(exc)
        user_pre(worker, req)

    def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
        try:
            user_post(worker, req, environ, resp)
        finally:
            try:
                close_span(req, resp)
            except Exception as exc:
                report(exc)

    pre_request.__hopscope_hook__ = True  # type: ignore[attr-defined]
    post_request.__hopscope_hook__ = True  # type: ignore[attr-defined]
    cfg.set("pre_request", pre_request)
    cfg.set("post_request", post_request)


def _runs_request_hooks(cfg: Any, app: Any) -> bool:
    """Whether the worker that serves ``app`` calls ``pre_request``/``post_request``: every
    WSGI worker, and gunicorn's own ASGI worker (``-k asgi``); uvicorn's workers do not
    (hopscope's uvicorn protocol classes record the server hop there)."""
    from .wrap import is_asgi

    if not is_asgi(app):
        return True
    try:
        from gunicorn.workers.gasgi import ASGIWorker  # gunicorn >= 24
    except ImportError:
        return False
    try:
        worker_class = cfg.worker_class
    except Exception:  # an unloadable worker class: gunicorn says so itself
        return False
    return isinstance(worker_class, type) and issubclass(worker_class, ASGIWorker)


def _hook_gunicorn(application: Any, app: Any) -> None:
    if _runs_request_hooks(application.cfg, app):
        try:
            _add_gunicorn_hooks(application.cfg)
        except Exception as exc:
            _say(f"cannot add gunicorn hooks: {type(exc).__name__}: {exc}")


def _patch_gunicorn(module: ModuleType) -> None:
    application_class = module.WSGIApplication
    load_wsgiapp = application_class.load_wsgiapp
    reload = application_class.reload

    @functools.wraps(load_wsgiapp)
    def patched_load_wsgiapp(self: Any) -> Any:
        try:
            app = load_wsgiapp(self)
        except BaseException as exc:
            if not _stopped(exc):
                _say(f"gunicorn could not load {_describe(self.app_uri)}: nothing to trace")
            raise
        # gunicorn loads ASGI apps here too (for uvicorn's workers): wrap() tells them apart.
        app = _wrap(app, _describe(self.app_uri))
        _hook_gunicorn(self, app)
        return app

    @functools.wraps(reload)
    def patched_reload(self: Any) -> None:
        reload(self)
        # A reload (SIGHUP) reads the config anew, without the hooks; an app the master
        # loaded (--preload) is not loaded again, so they are added here.
        app = getattr(self, "callable", None)
        if app is not None:
            _hook_gunicorn(self, app)

    run = application_class.run

    @functools.wraps(run)
    def patched_run(self: Any) -> None:
        cfg = self.cfg
        if cfg.daemon and not (cfg.print_config or cfg.check_config):
            # Daemonized, gunicorn would leave hopscope's process group: its requests
            # unrecorded once hopscope stops, and it left running after hopscope exits.
            _say(
                "gunicorn --daemon would detach the server from hopscope run: "
                "run it in the foreground (no -D/--daemon, no daemon = True)"
            )
            raise SystemExit(2)
        run(self)

    application_class.load_wsgiapp = patched_load_wsgiapp
    application_class.reload = patched_reload
    application_class.run = patched_run


# -- hypercorn ---------------------------------------------------------------------------


def _patch_hypercorn(module: ModuleType) -> None:
    wrap_app = module.wrap_app
    load_application = module.load_application

    @functools.wraps(wrap_app)
    def patched_wrap_app(app: Any, *args: Any, **kwargs: Any) -> Any:
        mode = kwargs.get("mode", args[1] if len(args) > 1 else None)
        return wrap_app(_wrap(app, "the app", mode), *args, **kwargs)

    @functools.wraps(load_application)
    def patched_load_application(path: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return load_application(path, *args, **kwargs)
        except BaseException as exc:
            if not _stopped(exc):
                _say(f"hypercorn could not load {_describe(path)}: nothing to trace")
            raise

    # Looked up as module globals when called (load_application calls wrap_app).
    module.__dict__["wrap_app"] = patched_wrap_app
    module.__dict__["load_application"] = patched_load_application


# -- werkzeug ----------------------------------------------------------------------------


def _patch_werkzeug(module: ModuleType) -> None:
    """``run_simple``, Werkzeug's development server: ``flask run``, ``app.run()`` and
    plain Werkzeug apps all end in it, which no framework patch reaches for the last.

    The app is wrapped as it is handed in, inside the debugger and static files that
    ``run_simple`` adds, so the span sees the app's own exceptions and responses.  Each
    request runs in the middleware's context on the thread that serves it, so the
    framework patches stand aside without :data:`_served`, which stays as it was: a test
    that starts a server leaves the process's test clients traced.
    """
    run_simple = module.run_simple

    @functools.wraps(run_simple)
    def patched_run_simple(*args: Any, **kwargs: Any) -> Any:
        global _served
        served = _served
        if "application" in kwargs:
            kwargs["application"] = _wrap(kwargs["application"], "the app", "wsgi")
        elif len(args) > 2:
            args = (*args[:2], _wrap(args[2], "the app", "wsgi"), *args[3:])
        _served = served
        return run_simple(*args, **kwargs)

    module.__dict__["run_simple"] = patched_run_simple


def _records_itself(app: Any) -> bool:
    """Whether a call of ``app`` is recorded without help: a framework patch records it
    (:func:`_patch_wsgi_call` marks those calls: Flask, Bottle, Falcon, Pyramid, Django),
    or the user's own ``wrap()`` does."""
    call = getattr(type(app), "__call__", None)  # noqa: B004 - the class's own method
    if getattr(call, "__hopscope_records__", False):
        return True
    from .wrap import is_traced

    return is_traced(app)


def _recorded(app: Any) -> Any:
    """``app``, or its middleware if no framework patch nor ``wrap()`` records it."""
    if _records_itself(app):
        return app
    from .wsgi import WSGIMiddleware

    return WSGIMiddleware(app)


#: Set while Werkzeug's test ``Client`` runs its app (see :func:`_patch_werkzeug_test`).
_in_client: ContextVar[bool] = ContextVar("hopscope_werkzeug_client", default=False)


def _patch_werkzeug_test(module: ModuleType) -> None:
    """Werkzeug's test ``Client`` (Flask's is one) runs the app through ``run_wsgi_app``,
    a plain WSGI call: a plain Werkzeug app has no framework call a patch could record.
    The app a ``Client`` hands it is recorded there (a new middleware per request, as
    for Django's client: nothing of the app is kept past its client), unless something
    records it already: a framework's patched call (a Flask app's requests stay
    Flask's, so they are recorded once), the user's ``wrap()``, an enclosing request,
    or a server's wrap point.

    Only the ``Client``'s calls: Werkzeug also runs apps through ``run_wsgi_app`` for
    ``Response.force_type`` and ``from_app``, and its own tests call it with apps no
    server would take (``str`` chunks, ``start_response`` after the first chunk)."""
    from .context import current

    in_client = _in_client
    client_class = module.Client
    client_run = client_class.run_wsgi_app
    run_wsgi_app = module.run_wsgi_app

    @functools.wraps(client_run)
    def patched_client_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = in_client.set(True)
        try:
            return client_run(self, *args, **kwargs)
        finally:
            in_client.reset(token)

    @functools.wraps(run_wsgi_app)
    def patched_run_wsgi_app(app: Any, *args: Any, **kwargs: Any) -> Any:
        if in_client.get():
            in_client.set(False)  # (the app's own calls of it, if any, are its own)
            if not (_served or current.get() is not None):
                try:
                    app = _recorded(app)
                except Exception:  # tracing never fails a test: the app runs untraced
                    pass
        return run_wsgi_app(app, *args, **kwargs)

    client_class.run_wsgi_app = patched_client_run
    # Looked up as a module global when called (Client.run_wsgi_app calls it).
    module.__dict__["run_wsgi_app"] = patched_run_wsgi_app


# -- waitress, cheroot, mod_wsgi-express -------------------------------------------------


def _wrap_wsgi(app: Any, what: str) -> Any:
    """``app`` wrapped for a WSGI server's wrap point, as ``run_simple``'s is: each of its
    requests runs in the middleware's context on the thread serving it, so the framework
    patches stand aside without :data:`_served`, which stays as it was (a test suite that
    starts a waitress keeps its test clients traced).  Anything but a callable is handed
    on untouched, for the server to say what is wrong with it."""
    global _served
    if not callable(app):
        return app
    served = _served
    wrapped = _wrap(app, what, "wsgi")
    _served = served
    return wrapped


def _patch_waitress(module: ModuleType) -> None:
    """waitress's ``create_server``: ``waitress-serve``, ``waitress.serve`` (and so
    ``pserve``'s ``egg:waitress``) and direct calls all hand the app to it.  Without it
    only apps of a patched framework were recorded: a plain WSGI app not at all, without a
    word.  (``waitress/__init__`` imports the name when this module has run: patched.)"""
    create_server = module.create_server

    @functools.wraps(create_server)
    def patched_create_server(*args: Any, **kwargs: Any) -> Any:
        if args:
            args = (_wrap_wsgi(args[0], _describe(args[0])), *args[1:])
        elif "application" in kwargs:
            kwargs["application"] = _wrap_wsgi(kwargs["application"], "the app")
        return create_server(*args, **kwargs)

    module.__dict__["create_server"] = patched_create_server


def _patch_cheroot(module: ModuleType) -> None:
    """cheroot's WSGI ``Server`` (``python -m cheroot``, CherryPy's own server, direct
    use): the app it was made with, kept as ``wsgi_app``, which its gateway calls."""
    server_class = module.Server
    init = server_class.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        app = self.__dict__.get("wsgi_app")
        if app is not None:
            self.wsgi_app = _wrap_wsgi(app, _describe(app))

    server_class.__init__ = __init__


def _patch_mod_wsgi_express(module: ModuleType) -> None:
    """mod_wsgi-express's ``ApplicationHandler``, which loads the app (a ``.wsgi`` script,
    a module or a Paste config) in each of Apache's Python processes and calls it for
    every request.  mod_wsgi itself (C) loads it by no Python hook: without this, only
    apps of a patched framework were recorded, and the plain ``application`` function of
    mod_wsgi's own examples not at all.  The app is wrapped as the handler calls it,
    after its mount-point fixes to the environ.  (``mod_wsgi.express.runtime`` from
    mod_wsgi 6, ``mod_wsgi.server`` before; mod_wsgi 6's ``mod_wsgi.server`` holds only
    the Apache module, and is left alone.)"""
    handler_class: Any = module.__dict__.get("ApplicationHandler")
    if handler_class is None:
        return
    init = handler_class.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)  # (a load failure: mod_wsgi logs it, as bare)
        app = self.__dict__.get("application")  # (none when it serves static files)
        if app is not None:
            self.application = _wrap_wsgi(app, _describe(app))

    handler_class.__init__ = __init__


# -- gevent ------------------------------------------------------------------------------


def _server_app(server: Any, app: Any) -> Any:
    """What gevent's ``server`` runs for ``app`` (:func:`_recorded`), made once and kept
    on the server, which holds the app anyway."""
    own = _own(server)
    kept = own.get(_MIDDLEWARE)
    if kept is None or kept[0] is not app:
        kept = own[_MIDDLEWARE] = (app, _recorded(app))
    return kept[1]


def _reporter(what: str) -> Callable[[Exception], None]:
    """A function that says, once per process and not once per request, that ``what``
    cannot be recorded, and why (the first failure)."""
    said: list[str] = []

    def report(exc: Exception) -> None:
        if not said:
            said.append(type(exc).__name__)
            _say(f"cannot record {what}: {type(exc).__name__}: {exc}")

    return report


def _patch_gevent_pywsgi(module: ModuleType) -> None:
    """gevent's ``WSGIHandler``: the server span of gunicorn's ``-k gevent_pywsgi`` worker
    (which runs no gunicorn request hooks) and of gevent's own ``WSGIServer``, opened
    around ``handle_one_response`` (:mod:`hopscope.tracing.servers.gevent_pywsgi`),
    unless a server hook of this request opened one already.  gevent's own server is
    also a wrap point, as ``run_simple`` is: the app it calls is recorded unless a
    framework patch or the user's ``wrap()`` records it (the handler takes the server's
    app anew for each request: its own attribute is what is replaced).

    (gevent goes through a sized result twice when it has no Content-Length: the
    middleware's body gives the second pass the app's own result, see ``wsgi._Body``.)"""
    from .context import server_parent

    handler_class = module.WSGIHandler
    handle = handler_class.handle_one_response
    report = _reporter("gevent's server hop")

    @functools.wraps(handle)
    def handle_one_response(self: Any) -> Any:
        if server_parent.get() is not None:
            return handle(self)
        if not _served:  # (gunicorn's wrap point wrapped its app already)
            try:
                self.application = _server_app(self.server, self.application)
            except Exception as exc:  # the app runs untraced
                report(exc)
        try:
            from .servers.gevent_pywsgi import close_span, open_span

            opened = open_span(self)
        except Exception as exc:  # tracing never fails a request
            report(exc)
            return handle(self)
        try:
            return handle(self)
        finally:
            try:
                close_span(self, opened)
            except Exception as exc:
                report(exc)

    handler_class.handle_one_response = handle_one_response


# -- frameworks, for servers without a hook ----------------------------------------------

_MIDDLEWARE = "_hopscope_middleware"


class _Result:
    """The app's own response as its caller sees it, with the middleware's iteration.

    A server only iterates a WSGI result and closes it, but a framework's call may be
    made by code that uses more of it: Django's ``WSGIHandler`` returns the
    ``HttpResponse`` itself, and tests read its ``status_code`` or take ``bytes()`` of
    it.  Iterating and closing go to the middleware's body (``iter()`` hands it over
    itself, so chunks pay no extra call); everything else reaches the app's object, and
    ``isinstance`` sees its class, as ``unittest.mock`` does it.
    """

    __slots__ = ("_hopscope_body", "_hopscope_result")

    def __init__(self, body: Any, result: Any) -> None:
        object.__setattr__(self, "_hopscope_body", body)
        object.__setattr__(self, "_hopscope_result", result)

    def __iter__(self) -> Any:
        return iter(self._hopscope_body)

    def close(self) -> None:
        self._hopscope_body.close()

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return type(self._hopscope_result)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hopscope_result, name)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # copy, deepcopy and pickle: of the app's object, as they would be bare.
        return self._hopscope_result.__reduce_ex__(protocol)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._hopscope_result, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._hopscope_result, name)

    def __bytes__(self) -> bytes:
        return bytes(self._hopscope_result)

    def __str__(self) -> str:
        return str(self._hopscope_result)

    def __repr__(self) -> str:
        return repr(self._hopscope_result)

    def __getitem__(self, key: Any) -> Any:
        return self._hopscope_result[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._hopscope_result[key] = value

    def __delitem__(self, key: Any) -> None:
        del self._hopscope_result[key]

    def __contains__(self, item: Any) -> bool:
        return item in self._hopscope_result


class _SizedResult(_Result):
    """For results with a length: servers may use ``len()`` (one chunk: Content-Length)."""

    __slots__ = ()

    def __len__(self) -> int:
        return len(self._hopscope_result)


def _app_result(body: Any) -> Any:
    """What the framework's caller gets: the app's own object where the middleware
    wrapped it (a file wrapper, or an untraced call, comes back as it is)."""
    from .wsgi import _Body

    if not isinstance(body, _Body):
        return body
    result = body._result
    return (_SizedResult if hasattr(result, "__len__") else _Result)(body, result)


#: The own dicts of apps whose class has none (``__slots__``: Litestar, Falcon, Sanic):
#: id -> (the app, its dict).  Holding the app keeps its id from being reused; few apps
#: serve requests in a process, and past 64 the oldest is let go.
_SLOTTED: dict[int, tuple[Any, dict[str, Any]]] = {}


def _own(app: Any) -> dict[str, Any]:
    """Where the framework patches keep an app's middleware: its ``__dict__``, or one
    kept here for an app without (:data:`_SLOTTED`)."""
    entry = _SLOTTED.get(id(app))
    if entry is not None and entry[0] is app:
        return entry[1]
    try:
        own: dict[str, Any] = app.__dict__
    except AttributeError:
        if len(_SLOTTED) >= 64:
            del _SLOTTED[next(iter(_SLOTTED))]
        own = {}
        _SLOTTED[id(app)] = (app, own)
    return own


def _patch_wsgi_call(cls: type) -> None:
    """Make ``cls.__call__`` record its requests when no hopscope span is current."""
    from .context import current

    call = cls.__call__

    @functools.wraps(call)
    def __call__(self: Any, environ: Any, start_response: Any) -> Any:
        if _served or current.get() is not None:
            return call(self, environ, start_response)
        own = _own(self)
        middleware = own.get(_MIDDLEWARE)
        if middleware is None:
            from .wrap import is_traced
            from .wsgi import WSGIMiddleware

            middleware = own.setdefault(
                _MIDDLEWARE,
                is_traced(self) or WSGIMiddleware(functools.partial(call, self)),
            )
        if middleware is True:  # traced inside (Flask's wsgi_app wrapped by the user)
            return call(self, environ, start_response)
        return _app_result(middleware(environ, start_response))

    __call__.__hopscope_records__ = True  # type: ignore[attr-defined]
    cls.__call__ = __call__  # type: ignore[method-assign]


def _patch_asgi_call(cls: type) -> None:
    """The ASGI twin of :func:`_patch_wsgi_call`: an ``async def``, so servers still see
    an ASGI 3 app (a sync wrapper made uvicorn take it for ASGI 2)."""
    from .context import current

    call = cls.__call__

    @functools.wraps(call)
    async def __call__(self: Any, scope: Any, receive: Any, send: Any) -> Any:
        if _served or current.get() is not None:
            return await call(self, scope, receive, send)
        own = _own(self)
        middleware = own.get(_MIDDLEWARE)
        if middleware is None:
            from .asgi import ASGIMiddleware
            from .wrap import is_traced

            middleware = own.setdefault(
                _MIDDLEWARE,
                is_traced(self) or ASGIMiddleware(functools.partial(call, self)),
            )
        if middleware is True:
            return await call(self, scope, receive, send)
        return await middleware(scope, receive, send)

    cls.__call__ = __call__  # type: ignore[method-assign]


def _patch_flask(module: ModuleType) -> None:
    _patch_wsgi_call(module.Flask)


def _patch_django_wsgi(module: ModuleType) -> None:
    _patch_wsgi_call(module.WSGIHandler)


def _patch_django_asgi(module: ModuleType) -> None:
    _patch_asgi_call(module.ASGIHandler)


def _django_route(match: Any) -> str | None:
    """Django's route (``items/<int:pk>``, or a regular expression) as a path."""
    route = getattr(match, "route", None)
    if not isinstance(route, str):
        return None
    return route if route.startswith(("^", "/")) else "/" + route


def _patch_django_base(module: ModuleType) -> None:
    """Note the route once Django resolved the request (after its middlewares' request
    phase, before the view), under any server: its handler keeps it on the request
    (``request.resolver_match``), which the middlewares do not see."""
    from .context import current

    base_class = module.BaseHandler
    resolve = getattr(base_class, "resolve_request", None)
    if resolve is None:  # Django < 3.1 resolves inside _get_response: no route then
        return

    @functools.wraps(resolve)
    def resolve_request(self: Any, request: Any) -> Any:
        match = resolve(self, request)
        context = current.get()
        if context is not None:
            try:
                _note_route(context, _django_route(match))
            except Exception:  # tracing never fails a request
                pass
        return match

    base_class.resolve_request = resolve_request


def _ignore_start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
    return None


def _no_close() -> None:
    pass


def _patch_django_test_client(module: ModuleType) -> None:
    """Django's test ``Client`` calls its ``ClientHandler`` with the environ alone and
    reads the ``HttpResponse`` it returns: not WSGI, so ``WSGIHandler``'s patch never
    sees those requests.  The handler's call is recorded here as a WSGI app's would be:
    status and headers as ``WSGIHandler`` sends them, and the content of a response the
    handler has in full (a streaming one is the client's to read later: its span ends
    without its body).  The client gets the handler's own response, or its exception,
    even if recording failed.  ``AsyncClient``'s handler: :func:`_patch_django_async_client`.
    """
    from .context import current

    handler_class = module.ClientHandler
    call = handler_class.__call__

    @functools.wraps(call)
    def __call__(self: Any, environ: Any) -> Any:
        if _served or current.get() is not None:
            return call(self, environ)
        from .wsgi import WSGIMiddleware

        responses: list[Any] = []

        def app(environ: Any, start_response: Any) -> Any:
            response = call(self, environ)
            responses.append(response)
            cookies = [("Set-Cookie", c.output(header="")) for c in response.cookies.values()]
            start_response(
                f"{response.status_code} {response.reason_phrase}", [*response.items(), *cookies]
            )
            return () if response.streaming else (response.content,)

        try:
            body = WSGIMiddleware(app)(environ, _ignore_start_response)
            for _ in body:  # the span's body, then its end: nothing of the response's runs
                pass
            getattr(body, "close", _no_close)()
        except Exception:
            if not responses:  # the handler's own exception
                raise
        return responses[0]

    handler_class.__call__ = __call__
    if hasattr(module, "AsyncClientHandler"):  # (Django 3.1 and later)
        _patch_django_async_client(module)


async def _ignore_send(message: Any) -> None:
    pass


def _django_asgi_headers(response: Any) -> list[tuple[bytes, bytes]]:
    """The response's headers as Django's ``ASGIHandler`` sends them."""
    headers = [(k.encode("ascii"), v.encode("latin-1")) for k, v in response.items()]
    for cookie in response.cookies.values():
        headers.append((b"Set-Cookie", cookie.output(header="").encode("ascii").strip()))
    return headers


def _patch_django_async_client(module: ModuleType) -> None:
    """Django's ``AsyncClient`` calls its ``AsyncClientHandler`` with a scope alone and
    awaits the ``HttpResponse``: not ASGI, so ``ASGIHandler``'s patch never sees those
    requests.  Its call is recorded as an ASGI app's would be, as the sync handler's
    is (:func:`_patch_django_test_client`): status and headers as ``ASGIHandler`` sends
    them, the content of a response the handler has in full, and the request body the
    client hands over in the scope (``_body_file``), read once and handed on in a new
    payload of the same bytes.  The client gets the handler's own response, or its
    exception, even if recording failed."""
    from .context import current

    handler_class = module.AsyncClientHandler
    payload_class = module.FakePayload
    call = handler_class.__call__

    @functools.wraps(call)
    async def __call__(self: Any, scope: Any) -> Any:
        if _served or current.get() is not None:
            return await call(self, scope)
        from .asgi import ASGIMiddleware

        called = False
        responses: list[Any] = []
        body = b""
        payload = scope.get("_body_file")
        if type(payload) is payload_class:
            body = payload.read()
            scope["_body_file"] = payload_class(body)
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def app(scope: Any, receive: Any, send: Any) -> None:
            nonlocal called
            if body:
                await receive()  # (the span's request body: the handler reads the payload)
            called = True
            response = await call(self, scope)
            responses.append(response)
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": _django_asgi_headers(response),
                }
            )
            content = b"" if response.streaming else response.content
            await send({"type": "http.response.body", "body": content})

        try:
            await ASGIMiddleware(app)(scope, receive, _ignore_send)
        except Exception:
            if not called:  # the recording failed before the handler ran: run it as is
                return await call(self, scope)
            if not responses:  # the handler's own exception
                raise
        return responses[0]

    handler_class.__call__ = __call__


def _patch_starlette(module: ModuleType) -> None:
    # FastAPI's __call__ ends in Starlette's, so FastAPI apps are covered too.
    _patch_asgi_call(module.Starlette)


def _patch_quart(module: ModuleType) -> None:
    # Quart's test client calls the app as ASGI, through ``Quart.__call__``.
    _patch_asgi_call(module.Quart)
    _patch_quart_route(module.Quart)


def _note_route(context: Any, route: Any) -> None:
    """Give the request's app span the route its framework matched (``http.route``).

    Starlette leaves its route in the scope, and Flask its request in the environ, where
    the middlewares read them when the response ends; Quart and Django keep theirs on a
    request object the middlewares do not know of, so their hooks hand it over here.
    The span's recording is the sink of the request's context (:data:`current`) when its
    sink takes recordings, as hopscope's all do; a sink that does not gets no route."""
    from .asgi import _WebSocketRecorder
    from .sinks import Recording

    recording = context.sink
    if (
        isinstance(route, str)
        and route
        and isinstance(recording, (Recording, _WebSocketRecorder))
        and getattr(recording, "route", "") is None  # the app span's, and not set yet
        and context.span_id == recording.span_id  # (not a span of the user's)
    ):
        recording.route = route  # type: ignore[union-attr]


def _note_error(context: Any, error: Any) -> None:
    """Record on the request's WSGI app span the exception its framework caught and
    answered with an error page, as if the app had raised it (see :func:`_note_route`
    for whose span that is)."""
    from .wsgi import _Exchange

    recording = context.sink
    if (
        isinstance(error, Exception)
        and isinstance(recording, _Exchange)
        and context.span_id == recording.span_id
        and recording.error is None
        and recording.end_at < 0
    ):
        recording.failed(error)


def _quart_route(context: Any, request_context: Any, kind: str) -> None:
    if request_context is None:
        from quart import globals as quart_globals

        request_context = getattr(quart_globals, f"{kind}_ctx")  # (a proxy of the current one)
    request = getattr(request_context, kind)
    _note_route(context, getattr(getattr(request, "url_rule", None), "rule", None))


def _patch_quart_route(cls: type) -> None:
    """Note the matched rule when Quart starts to handle a request or a WebSocket (its
    context is pushed, so routing is done), before any ``before_request`` or
    ``before_websocket`` may answer it."""
    from .context import current

    def patch(name: str, kind: str) -> None:
        dispatch = getattr(cls, name)

        @functools.wraps(dispatch)
        async def full_dispatch(self: Any, *args: Any, **kwargs: Any) -> Any:
            context = current.get()
            if context is not None:
                try:
                    _quart_route(context, args[0] if args else kwargs.get(f"{kind}_context"), kind)
                except Exception:  # tracing never fails a request
                    pass
            return await dispatch(self, *args, **kwargs)

        setattr(cls, name, full_dispatch)

    patch("full_dispatch_request", "request")
    patch("full_dispatch_websocket", "websocket")


def _patch_quart_routes_only(module: ModuleType) -> None:
    _patch_quart_route(module.Quart)


def _patch_falcon_routes(module: ModuleType) -> None:
    """Note the URI template Falcon matched (``/items/{item_id:int}``), WSGI or ASGI,
    HTTP or WebSocket: it keeps it on its request (``req.uri_template``), which the
    middlewares do not see, so its router's answer is handed over as it is made.

    And the exception a WSGI app's handler raised: Falcon answers 500 and writes the
    traceback to ``wsgi.errors`` only (its ASGI app logs it, which hopscope records), so
    its default handler hands it to the request's span (:func:`_note_error`)."""
    from .context import current

    app_class = module.App
    get_responder = app_class._get_responder
    error_handler = app_class._python_error_handler

    @functools.wraps(error_handler)
    def _python_error_handler(self: Any, req: Any, resp: Any, error: Any, params: Any) -> Any:
        context = current.get()
        if context is not None:
            try:
                _note_error(context, error)
            except Exception:  # tracing never fails a request
                pass
        return error_handler(self, req, resp, error, params)

    # (Set before the user's App() exists: its __init__ registers the bound method.)
    app_class._python_error_handler = _python_error_handler

    @functools.wraps(get_responder)
    def _get_responder(self: Any, req: Any) -> Any:
        found = get_responder(self, req)
        context = current.get()
        if context is not None:
            try:
                _note_route(context, found[3])
            except Exception:  # tracing never fails a request
                pass
        return found

    app_class._get_responder = _get_responder


def _patch_sanic_routes(module: ModuleType) -> None:
    """Note the route Sanic's router matched (``/items/<item_id:int>``, in Sanic's syntax,
    as ``request.uri_template`` gives it): Sanic keeps it on its request
    (``request.route``), which the middlewares do not see.  ``Router.get`` is what
    ``Sanic.handle_request`` asks once per request (HTTP or WebSocket), before any of the
    app's middleware may answer; its cache stays Sanic's."""
    from .context import current

    router_class = module.Router
    get = router_class.get

    @functools.wraps(get)
    def patched_get(self: Any, *args: Any, **kwargs: Any) -> Any:
        found = get(self, *args, **kwargs)
        context = current.get()
        if context is not None:
            try:
                path = found[0].path
                _note_route(context, "/" + path if isinstance(path, str) else None)
            except Exception:  # tracing never fails a request
                pass
        return found

    router_class.get = patched_get


def _patch_pyramid_routes(module: ModuleType) -> None:
    """Note the route pattern Pyramid's URL dispatch matched (``/items/{item_id}``, as
    ``request.matched_route.pattern``): its router asks the routes mapper once per
    request, before the view or any tween after it runs, and keeps the route on its
    request, which the middlewares do not see.  (Traversal matches no route: none.)"""
    from .context import current

    mapper_class = module.RoutesMapper
    call = mapper_class.__call__

    @functools.wraps(call)
    def __call__(self: Any, request: Any) -> Any:
        info = call(self, request)
        context = current.get()
        if context is not None:
            try:
                pattern = info["route"].pattern if info["route"] is not None else None
                if isinstance(pattern, str) and not pattern.startswith("/"):
                    pattern = "/" + pattern  # (Pyramid matches "items/{id}" as "/items/{id}")
                _note_route(context, pattern)
            except Exception:  # tracing never fails a request
                pass
        return info

    mapper_class.__call__ = __call__


def _patch_falcon(module: ModuleType) -> None:
    _patch_falcon_routes(module)
    _patch_wsgi_call(module.App)  # (falcon.asgi.App has a __call__ of its own)


def _patch_falcon_asgi(module: ModuleType) -> None:
    _patch_asgi_call(module.App)


def _patch_litestar(module: ModuleType) -> None:
    _patch_asgi_call(module.Litestar)


def _patch_bottle(module: ModuleType) -> None:
    _patch_wsgi_call(module.Bottle)


def _patch_pyramid(module: ModuleType) -> None:
    _patch_wsgi_call(module.Router)


def _patch_sanic(module: ModuleType) -> None:
    """Sanic's own server calls its app by no interface hopscope wraps: say so, and how
    to get traces (Sanic's ASGI app under uvicorn or hypercorn is traced), when the
    command starts it, rather than serve it untraced without a word."""
    sanic_class = module.Sanic

    def patch(name: str) -> None:
        import inspect

        serve = inspect.getattr_static(sanic_class, name, None)  # (on a mixin of Sanic's)
        if not isinstance(serve, classmethod):
            return
        function = serve.__func__

        @functools.wraps(function)
        def patched(cls: Any, *args: Any, **kwargs: Any) -> Any:
            _say(
                "Sanic's own server cannot be traced: serve the app as ASGI instead, "
                "e.g. hopscope run -- uvicorn MODULE:app"
            )
            return function(cls, *args, **kwargs)

        setattr(sanic_class, name, classmethod(patched))

    patch("serve")
    patch("serve_single")
    _patch_asgi_call(sanic_class)  # its ASGI app, under an ASGI server without a hook


# -- mod_wsgi's server hop, uWSGI's apps of no framework (session 11b) ------------------
# (Kept apart: the two PATCHES entries of mod_wsgi-express name _patch_mod_wsgi_hop, and
# the uWSGI entries are added after PATCHES, from uWSGI's own options.)


def _patch_mod_wsgi_hop(module: ModuleType) -> None:
    """mod_wsgi-express's ``ApplicationHandler`` as :func:`_patch_mod_wsgi_express` makes
    it, plus the server hop: the app it wrapped is called inside a ``server`` span made
    from mod_wsgi's own stamps in the environ (and a ``queue`` span for the wait for a
    daemon process), :class:`hopscope.tracing.servers.mod_wsgi.ServerHop`.  Its app
    span, opened inside, is the server span's child."""
    _patch_mod_wsgi_express(module)
    handler_class: Any = module.__dict__.get("ApplicationHandler")
    if handler_class is None:
        return
    init = handler_class.__init__
    report = _reporter("mod_wsgi's server hop")

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        app = self.__dict__.get("application")
        if app is not None and callable(app):
            try:
                from .servers.mod_wsgi import ServerHop

                self.application = ServerHop(app, report)
            except Exception as exc:  # the app span is recorded all the same
                report(exc)

    handler_class.__init__ = __init__


#: uWSGI's ways to load a WSGI app that hopscope does not reach: they take the callable
#: from C, right after running code of their own (``--wsgi-file``: :func:`_uwsgi_watch_file`).
_UWSGI_UNREACHABLE = ("eval", "paste", "pecan")


def _uwsgi_options(opt: dict[str, Any], name: str) -> list[str]:
    """An option's values as text (uWSGI keeps bytes, a list when given more than once)."""
    value = opt.get(name)
    values = value if isinstance(value, list) else [value]
    return [
        v.decode(errors="replace") if isinstance(v, bytes) else v
        for v in values
        if isinstance(v, (bytes, str))
    ]


def _uwsgi_recorded(app: Any) -> Any:
    """``app`` as uWSGI should call it: recorded, unless a framework patch or the user's
    ``wrap()`` records it already (a Flask or Django app is left as it is)."""
    if not callable(app) or _records_itself(app):
        return app
    return _wrap_wsgi(app, _describe(app))


def _uwsgi_app_patch(name: str) -> Callable[[ModuleType], None]:
    """The patch of the module uWSGI loads the app from (``--module app:application``):
    uWSGI imports it through Python's import system, then looks the callable up in the
    module's dict from C; once the module has run, the callable there is replaced by the
    middleware, as ``application = wrap(application)`` in the module would.  A factory
    (``app:create_app()``, which uWSGI calls) is made to return its app recorded."""
    factory = name.endswith("()")
    attr = name[:-2] if factory else name

    def patch(module: ModuleType) -> None:
        own = module.__dict__
        app = own.get(attr)
        if app is None or not callable(app):
            return
        if not factory:
            own[attr] = _uwsgi_recorded(app)
            return

        @functools.wraps(app)
        def make(*args: Any, **kwargs: Any) -> Any:
            made = app(*args, **kwargs)
            try:
                return _uwsgi_recorded(made)
            except Exception:  # tracing never stops the program: served untraced
                return made

        own[attr] = make

    return patch


#: The prefix of the module uWSGI runs a ``--wsgi-file`` (``--file``, ``--mount /x=app.py``)
#: as: ``uwsgi_file_`` and the file's path made a name.
_UWSGI_FILE = "uwsgi_file_"


def _uwsgi_file_frame() -> Any:
    """The frame of a ``--wsgi-file`` module running now, if an import of it is what
    installed hopscope (the outermost: uWSGI runs it from C)."""
    found = None
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__")
        if (
            frame.f_code.co_name == "<module>"
            and isinstance(name, str)
            and name.startswith(_UWSGI_FILE)
        ):
            found = frame
        frame = frame.f_back  # type: ignore[assignment]
    return found


def _uwsgi_wrap_at_return(namespace: dict[str, Any], attr: str, frame: Any = None) -> None:
    """Replace ``namespace[attr]`` by the middleware when the module running in
    ``namespace`` returns: the one moment between its last line and uWSGI's lookup of
    the callable (from C, at once).  A trace function is the only hook there: it is on
    for this thread while the module runs (a call a frame that is not it: nothing), and
    off once it returned."""

    def at_return(frame: Any, event: str, arg: Any) -> Any:
        if event == "return":
            sys.settrace(None)
            try:
                app = namespace.get(attr)
                if app is not None:
                    namespace[attr] = _uwsgi_recorded(app)
            except Exception:  # tracing never stops the program: served untraced
                pass
        return at_return

    def new_frame(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_globals is namespace and frame.f_code.co_name == "<module>":
            frame.f_trace_lines = False
            return at_return
        return None

    if frame is not None:
        frame.f_trace_lines = False
        frame.f_trace = at_return
    sys.settrace(new_frame)


def _uwsgi_watch_file(attr: str) -> bool:
    """Have the app of uWSGI's ``--wsgi-file`` recorded; False when it cannot be: it was
    taken already (its module ran before hopscope was installed, as when the file
    imports no module not yet imported) and nothing records it, or a debugger or coverage
    holds the trace function."""
    if sys.gettrace() is None:
        frame = _uwsgi_file_frame()
        if frame is not None:  # (an import of the file installed hopscope)
            _uwsgi_wrap_at_return(frame.f_globals, attr, frame)
            return True
    loaded = [m for n, m in list(sys.modules.items()) if n.startswith(_UWSGI_FILE)]
    if loaded:
        return all(_records_itself(m.__dict__.get(attr)) for m in loaded)
    if sys.gettrace() is not None:
        return False
    # Not loaded yet (uWSGI's --lazy-apps: each worker loads it after hopscope was
    # installed): uWSGI runs it through PyImport_ExecCodeModule, which asks importlib's
    # _fix_up_module for the module's namespace just before its code runs.
    external: Any = sys.modules.get("_frozen_importlib_external")
    fix_up = getattr(external, "_fix_up_module", None)
    if fix_up is None:
        return False

    @functools.wraps(fix_up)
    def _fix_up_module(ns: Any, name: Any, *args: Any, **kwargs: Any) -> Any:
        result = fix_up(ns, name, *args, **kwargs)
        if (
            isinstance(name, str)
            and name.startswith(_UWSGI_FILE)
            and isinstance(ns, dict)
            and sys.gettrace() is None
        ):
            _uwsgi_wrap_at_return(ns, attr)
        return result

    external._fix_up_module = _fix_up_module
    return True


def _uwsgi_app_patches() -> dict[str, Callable[[ModuleType], None]]:
    """Inside uWSGI's embedded Python only (its ``uwsgi`` module exists, with the
    command's options in ``uwsgi.opt``): a patch for each module uWSGI loads an app from
    (``--module``/``-w``, ``--wsgi``, ``--mount /x=module:callable``, with ``--callable``).
    For the loaders that run no import hopscope sees (``--wsgi-file``), one line says that
    a WSGI app of no framework is not recorded there, and what to do."""
    uwsgi = sys.modules.get("uwsgi")
    opt = getattr(uwsgi, "opt", None)
    if not isinstance(opt, dict):
        return {}
    default = (_uwsgi_options(opt, "callable") or ["application"])[-1]
    specs = _uwsgi_options(opt, "module") + _uwsgi_options(opt, "wsgi")
    unreachable = [f"--{name}" for name in _UWSGI_UNREACHABLE if _uwsgi_options(opt, name)]
    files = [f"--{name}" for name in ("wsgi-file", "file") if _uwsgi_options(opt, name)]
    for mount in _uwsgi_options(opt, "mount"):
        target = mount.partition("=")[2] or mount
        if target.endswith((".py", ".wsgi")):
            files.append("--mount")
        elif ":" in target and not target.endswith(".ini"):
            specs.append(target)
        else:
            unreachable.append("--mount")
    if files and not _uwsgi_watch_file(default):
        unreachable.insert(0, files[0])
    patches: dict[str, Callable[[ModuleType], None]] = {}
    for spec in specs:
        module, _, name = spec.partition(":")
        if module and module not in PATCHES:
            patches[module] = _uwsgi_app_patch(name or default)
    if unreachable:
        _say(
            f"uWSGI took the app of {unreachable[0]} from C before hopscope could wrap it: a "
            "WSGI app of no framework there is not recorded (Flask, Django and the other "
            "frameworks are); "
            "load it with --module MODULE:CALLABLE, or wrap it in code: "
            "application = hopscope.tracing.wrap(application)"
        )
    return patches


#: The patches that only hand the middlewares the route a framework keeps on its
#: request: for a process that wraps the app itself (``hopscope run TARGET``).
ROUTE_PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "quart.app": _patch_quart_routes_only,
    "django.core.handlers.base": _patch_django_base,
    "falcon.app": _patch_falcon_routes,
    "sanic.router": _patch_sanic_routes,
    "pyramid.urldispatch": _patch_pyramid_routes,
}

#: Module name -> the patch applied right after that module first runs.
PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "uvicorn.config": _patch_uvicorn,
    "uvicorn.supervisors.basereload": _patch_uvicorn_reload,
    "gunicorn.app.wsgiapp": _patch_gunicorn,
    "hypercorn.utils": _patch_hypercorn,
    "werkzeug.serving": _patch_werkzeug,
    "werkzeug.test": _patch_werkzeug_test,
    "gevent.pywsgi": _patch_gevent_pywsgi,
    "waitress.server": _patch_waitress,
    "cheroot.wsgi": _patch_cheroot,
    "mod_wsgi.express.runtime": _patch_mod_wsgi_hop,
    "mod_wsgi.server": _patch_mod_wsgi_hop,
    "flask.app": _patch_flask,
    "django.core.handlers.wsgi": _patch_django_wsgi,
    "django.core.handlers.asgi": _patch_django_asgi,
    "django.core.handlers.base": _patch_django_base,
    "django.test.client": _patch_django_test_client,
    "starlette.applications": _patch_starlette,
    "quart.app": _patch_quart,
    "falcon.app": _patch_falcon,
    "falcon.asgi.app": _patch_falcon_asgi,
    "litestar.app": _patch_litestar,
    "sanic.app": _patch_sanic,
    "sanic.router": _patch_sanic_routes,
    "bottle": _patch_bottle,
    "pyramid.router": _patch_pyramid,
    "pyramid.urldispatch": _patch_pyramid_routes,
}


# (session 11b) uWSGI's app modules, read from its options: nothing outside uWSGI.
PATCHES.update(_uwsgi_app_patches())


def _apply(patch: Callable[[ModuleType], None], module: ModuleType) -> None:
    if getattr(module, "__hopscope_patched__", False):
        return
    try:
        patch(module)
    except Exception as exc:
        _say(f"cannot instrument {module.__name__}: {type(exc).__name__}: {exc}")
        return
    module.__hopscope_patched__ = True  # type: ignore[attr-defined]


class _PatchingLoader:
    """The module's own loader, plus the patch once the module has run."""

    def __init__(self, loader: Any, patch: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._patch = patch

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self._loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _apply(self._patch, module)

    def __getattr__(self, name: str) -> Any:
        # get_source, get_resource_reader, is_package...: the real loader's.
        return getattr(self._loader, name)


#: Modules a command runs as ``__main__`` (``python -m bottle module:app``) -> the name
#: their patch needs defined there: see :meth:`_PatchingFinder._watch_main`.
_RUN_AS_MAIN = {"bottle": "Bottle"}


class _PatchingFinder:
    """A ``sys.meta_path`` finder that only ever answers for the modules it patches."""

    def __init__(self, patches: dict[str, Callable[[ModuleType], None]]) -> None:
        self._patches = patches
        self._main: str | None = None

    def _watch_main(self, name: str) -> None:
        """Patch ``__main__`` when it is the module ``name`` run by ``python -m``.

        runpy looks the module up through ``sys.meta_path`` (this finder is asked for
        it) but runs its code as ``__main__``, where its loader's ``exec_module`` never
        runs, and Bottle then stands in for ``bottle`` itself in ``sys.modules``: the
        import hook never sees it.  So, once asked for such a module, each later import
        (Bottle's own, then the user's module that ``python -m bottle`` loads, before any
        request) checks whether ``__main__`` runs that module and has defined what the
        patch needs; then it is patched, once.  An ordinary import of the module ends
        the watch.
        """
        main = sys.modules.get("__main__")
        module = sys.modules.get(name)
        if module is not None and module is not main:
            self._main = None  # imported as itself: its loader patched it
            return
        spec = getattr(main, "__spec__", None)
        if main is None or getattr(spec, "name", None) != name:
            return
        if isinstance(getattr(main, _RUN_AS_MAIN[name], None), type):
            self._main = None
            _apply(self._patches[name], main)

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if self._main is not None:
            self._watch_main(self._main)
        patch = self._patches.get(fullname)
        if patch is None:
            return None
        if fullname in _RUN_AS_MAIN and fullname not in sys.modules:
            self._main = fullname
        for finder in sys.meta_path:
            if finder is self:
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec: ModuleSpec | None = find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None  # nothing to hook into: let the import go on as usual
        spec.loader = _PatchingLoader(spec.loader, patch)  # type: ignore[assignment]
        return spec

    def invalidate_caches(self) -> None:
        pass


_installed = False


def install(patches: dict[str, Callable[[ModuleType], None]] | None = None) -> None:
    """Patch the servers and frameworks this process imports (once per process);
    ``patches`` :data:`ROUTE_PATCHES` for only the routes (see there)."""
    global _installed
    if _installed:
        return
    _installed = True
    chosen = PATCHES if patches is None else patches
    for name, patch in chosen.items():
        module = sys.modules.get(name)
        if module is not None:
            _apply(patch, module)
    sys.meta_path.insert(0, _PatchingFinder(chosen))
