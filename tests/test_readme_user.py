"""What a new user meets following the README from top to bottom."""

from __future__ import annotations

import sys
from pathlib import Path

import hopscope
import hopscope.tracing
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def make(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "data"))
    monkeypatch.syspath_prepend(str(ROOT / "screenshots"))
    sys.modules.pop("make", None)
    import make as module

    yield module
    sys.modules.pop("make", None)


def test_screenshots_tidy_keeps_dots_under_a_plain_editable_install(
    make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: `pip install -e '.[screenshots]'` (not strict) then `python screenshots/make.py`.

    Such an install makes ``hopscope.__path__`` an import hook's name, not a folder; taking
    its parent gave ".", and every dot of the recording became ".../site-packages", so the
    demo's "db.query" span was not found and make.py stopped.
    """
    monkeypatch.setattr(hopscope, "__path__", ["__editable__.hopscope-0.1.0.finder.__path_hook__"])
    package = Path(hopscope.tracing.__file__).parent.parent
    where = str(package / "tracing" / "asgi.py")
    events = [{"kind": "span_start", "name": "db.query", "attrs": {"code.filepath": where}}]
    tidied = make.tidy(events)
    assert tidied[0]["name"] == "db.query"
    assert tidied[0]["attrs"]["code.filepath"] == ".../site-packages/hopscope/tracing/asgi.py"
