"""hopscope's bootstrap, run by Python at start-up in every process of ``hopscope run --``.

``hopscope run -- COMMAND`` puts this file's folder first on ``PYTHONPATH`` (as
``opentelemetry-instrument`` and ``ddtrace-run`` do) and leaves the rest of it intact, so
processes the command spawns run it too.  The folder holds nothing but this file, and
everything it imports lives under ``hopscope``: none of the user's modules (an ``app.py``,
a ``tracing.py``) can be shadowed.

Start-up stays cheap: this file imports nothing until the process first imports a server
or framework (:data:`TRIGGERS`); only then is :mod:`hopscope.tracing.inject` imported and
its import hooks installed.  Processes that serve nothing (a reloader's watcher, a
multiprocessing helper, a ``python -c`` the app runs) never import hopscope at all.

Python imports only the first ``sitecustomize`` on ``sys.path``, so the one this file
stands in front of (the user's, or the distribution's) is imported next, the way
``ddtrace`` does it: its errors are reported by Python exactly as they would have been.

This is package data, not a module of hopscope: it is only ever imported as
``sitecustomize``.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # (no typing import at start-up; mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

#: Top-level packages whose first import installs hopscope's hooks: those of the modules
#: in ``hopscope.tracing.inject.PATCHES`` (a test keeps the two in step).
TRIGGERS = frozenset(
    {
        "bottle",
        "cheroot",
        "django",
        "falcon",
        "flask",
        "gevent",
        "gunicorn",
        "hypercorn",
        "litestar",
        "mod_wsgi",
        "pyramid",
        "quart",
        "sanic",
        "starlette",
        "uvicorn",
        "waitress",
        "werkzeug",
    }
)


def _hopscope_first_to_say(key: str) -> bool:
    """Whether no other process of this ``hopscope run`` said this yet: each worker of a
    server would (``hopscope.tracing.inject._first_to_say``, which cannot be imported
    here, does the same)."""
    folder = os.environ.get("HOPSCOPE_SAID")
    if not folder:
        return True
    try:
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
        name = os.path.join(folder, f"bootstrap-{key.replace(' ', '-')}")
        os.close(os.open(name, flags, 0o600))  # (as hopscope's other files)
    except FileExistsError:
        return False
    except OSError:
        return True
    return True


def _hopscope_install() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _HopscopeTrigger)]
    try:
        from hopscope.tracing.inject import install
    except Exception as exc:
        if _hopscope_first_to_say("cannot import hopscope"):
            sys.stderr.write(
                f"hopscope: not tracing this process ({sys.executable}): "
                f"cannot import hopscope: {type(exc).__name__}: {exc}\n"
            )
        return
    install()


class _HopscopeTrigger:
    """A ``sys.meta_path`` entry that finds nothing of its own: it only notices the first
    import of a trigger package, installs hopscope's hooks, and lets that import go on
    (through the hooks, for a trigger they patch)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        # Inside uWSGI (its embedded ``uwsgi`` module exists) any import installs them:
        # the app module uWSGI imports is one they patch (``--module app:application``).
        if fullname in TRIGGERS or "uwsgi" in sys.modules:
            _hopscope_install()
            # The hooks just went first in ``sys.meta_path``, a place this very import has
            # gone past: a module they patch (``bottle`` is one module, and uWSGI's app
            # module) is handed to them here, or it would load unpatched.
            hooks = sys.meta_path[0] if sys.meta_path else None
            if hooks is not None and type(hooks).__name__ == "_PatchingFinder":
                return hooks.find_spec(fullname, path, target)
        return None

    def invalidate_caches(self) -> None:
        pass


def _hopscope_chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    removed = [(i, e) for i, e in enumerate(sys.path) if e and os.path.abspath(e) == here]
    for index, _ in reversed(removed):
        del sys.path[index]
    ours = sys.modules.pop("sitecustomize", None)
    try:
        __import__("sitecustomize")
    except ImportError as exc:
        if exc.name != "sitecustomize":
            raise
        if ours is not None:
            sys.modules["sitecustomize"] = ours
    finally:
        for index, entry in removed:
            sys.path.insert(index, entry)


if __name__ == "sitecustomize":  # not when a test loads this file to read TRIGGERS
    if TRIGGERS.intersection(sys.modules):
        _hopscope_install()
    else:
        sys.meta_path.insert(0, _HopscopeTrigger())
    _hopscope_chain()
