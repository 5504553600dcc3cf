"""``hopscope run TARGET``'s own listening socket, as the server it hands it to uses it."""

from __future__ import annotations

import socket

from hopscope.app.run import _listen


def test_a_connection_made_before_the_server_is_up_has_nagle_off() -> None:
    # hopscope binds the app's socket before gunicorn's worker exists; a client (the
    # proxy, retrying while the app starts) that connects in that moment sits in the
    # backlog with the options the socket had then.  gunicorn sets TCP_NODELAY only once
    # up, so that kept-alive connection had Nagle's algorithm on, and every response on it
    # waited some 40 ms for the proxy's delayed ACK between gunicorn's head and body.
    listener = _listen("127.0.0.1", 0)
    try:
        with socket.create_connection(listener.getsockname()[:2], timeout=5):
            accepted, _ = listener.accept()  # (only now, as a worker that came up late)
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        listener.close()
