"""Forked workers get ids and sinks of their own, however they were forked.

hopscope keeps per-process state: the generator its trace and span ids come from, and
each sink's queue and thread.  ``os.fork()`` runs the at-fork hooks that renew them in a
child (records and sinks register theirs), but a server that forks in C runs no Python
at all there: uWSGI's master loads the app and forks its workers with ``fork(2)``, and
calls ``PyOS_AfterFork_Child`` only with ``--py-call-osafterfork``.  Every worker then
drew the same ids as its siblings, so the collector took two workers' requests for one
and kept only one of them (half the requests of a two-worker uWSGI went missing).

:func:`after_fork` does what the hooks do, for a process that missed them: it compares
the process ids that state was made in with this one, so it is harmless to call any
number of times.
:func:`watch` (called when a middleware is made, never per request) calls it at once, for
an app loaded in a worker that was forked before (uWSGI's ``--lazy-apps``, or the
bootstrap wrapping the app at a worker's first request), and under uWSGI registers it
as a post-fork hook, for an app loaded in the master before the workers are forked.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from . import records, sinks

__all__ = ["after_fork", "watch"]

_uwsgi_hooked = False


def after_fork() -> None:
    """Renew the id generator and the sinks' per-process parts in a forked child whose
    fork ran no at-fork hooks; does nothing to what this process made itself."""
    pid = os.getpid()
    if records._seed_pid != pid:
        records._reseed_after_fork()
    for sink in list(sinks._live_sinks):
        if sink._pid != pid:
            sink._after_fork()


def watch() -> None:
    """Catch up on a fork that ran no hooks, and hook uWSGI's forks to come."""
    after_fork()
    uwsgi = sys.modules.get("uwsgi")  # only inside uWSGI's embedded interpreter
    if uwsgi is not None and not _uwsgi_hooked:
        _hook_uwsgi(uwsgi)


def _hook_uwsgi(uwsgi: Any) -> None:
    """Run :func:`after_fork` in each worker uWSGI forks, before anything the user
    registered.  Through ``uwsgidecorators``' chain when it is there (it replaces
    ``uwsgi.post_fork_hook`` with its chain when first imported, by the app or here, so a
    hook set beside it would be lost); a hook the app set itself is kept, in the chain."""
    global _uwsgi_hooked
    _uwsgi_hooked = True
    previous = getattr(uwsgi, "post_fork_hook", None)
    uwsgidecorators: Any
    try:
        uwsgidecorators = importlib.import_module("uwsgidecorators")
    except Exception:  # not installed (Debian ships it apart), or a partial uWSGI
        uwsgidecorators = None
    chain = getattr(uwsgidecorators, "postfork_chain", None)
    chain_hook = getattr(uwsgidecorators, "postfork_chain_hook", None)
    if type(chain) is list and chain_hook is not None:
        if callable(previous) and previous is not chain_hook and previous not in chain:
            chain.insert(0, previous)
        chain.insert(0, after_fork)
        uwsgi.post_fork_hook = chain_hook
        return

    def post_fork_hook() -> None:
        after_fork()
        if callable(previous):
            previous()

    uwsgi.post_fork_hook = post_fork_hook
