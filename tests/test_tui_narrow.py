"""The Timeline tab in small terminals: every span stays one line of name, bar and time.

The trace is the demo's recording (``tests/data/demo-trace.jsonl``, the snapshots' one),
whose ``GET /api/slow`` crosses every hop with nested user spans: the deepest labels
there are the ones a narrow terminal squeezes first.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from data.make_demo_trace import TARGET, cut
from hopscope.tracing.model import Span
from hopscope.tracing.tracefile import read_events
from hopscope.tui import formatting
from hopscope.tui.app import HopscopeApp
from hopscope.tui.keymap import ENV
from hopscope.tui.source import QueueSource
from hopscope.tui.timeline import Timeline
from hopscope.tui.waterfall import span_kind
from textual.pilot import Pilot
from uitools import wait_for

#: What a bar or a tick on it may be drawn with.
BAR_CELLS = set("█▉▊▋▌▍▎▏│▸·•✖✕")


@pytest.fixture(autouse=True)
def no_user_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))


def label_of(span: Span) -> str:
    """The row's name as the timeline words it (the hop first when the name lacks it)."""
    kind, name = span_kind(span), span.name or "(unnamed)"
    if kind not in ("user", "queue", "background") and not name.startswith(kind):
        return f"{kind} {name}"
    return name


def test_fit_keeps_the_120_column_look_and_never_overflows() -> None:
    # The spans list is 70 cells wide in a 120-column terminal: the label stays 30.
    assert Timeline.fit(70) == (30, 31)
    for width in range(20, 200):
        label, bar = Timeline.fit(width)
        assert label + bar + Timeline.DURATION_WIDTH <= width - 1, width
        assert label >= Timeline.LABEL_MIN and bar >= 1, width
        if label < Timeline.LABEL_WIDTH and label > Timeline.LABEL_MIN:
            assert bar == Timeline.BAR_MIN, width  # the label gave way, not the bar
    assert Timeline.fit(36)[0] < 30  # a 40-column terminal
    assert Timeline.fit(56) == (30, 17)  # a 60-column one keeps the whole label


@pytest.mark.parametrize("size", [(40, 20), (60, 20)], ids=["40x20", "60x20"])
def test_timeline_rows_keep_name_bar_and_duration_on_one_line(size: tuple[int, int]) -> None:
    events, now = cut(list(read_events(TARGET)))
    source = QueueSource("demo http://127.0.0.1:8000")
    source.push(events)
    app = HopscopeApp(source, title="hopscope demo", clock=lambda: now)

    async def scenario(pilot: Pilot[None]) -> None:
        await wait_for(pilot, lambda: app.store.total == 12, "the requests")
        await pilot.press("s", *"/api/slow", "enter", "n", "1")
        await wait_for(pilot, lambda: app.detail.trace is app.selected_trace, "the detail")
        assert app.detail.tabs.active == "timeline"
        timeline = app.detail.timeline
        spans_list = timeline.spans_list
        rows = timeline.rows
        assert len(rows) >= 8 and max(depth for depth, _ in rows) >= 4
        await pilot.pause(0.1)
        width = spans_list.scrollable_content_region.width
        assert width <= size[0]
        label_width, bar_width = Timeline.fit(width)
        # One line per span: a row too wide would wrap onto a second line.
        assert spans_list.virtual_size.height == len(rows)
        for index, (_, span) in enumerate(rows):
            spans_list.highlighted = index  # scrolls it into view
            await pilot.pause()
            line = spans_list.render_line(index - round(spans_list.scroll_y)).text
            label = line[:label_width].strip()
            expected = label_of(span)
            if label.endswith("…"):
                assert len(label) >= 4 and expected.startswith(label[:-1]), (line, expected)
            else:
                assert label == expected, line
            assert BAR_CELLS & set(line[label_width : label_width + bar_width]), line
            assert span.duration_ns is not None
            assert line.rstrip().endswith(formatting.duration(span.duration_ns)), line
        # The axis starts where the bars do.
        axis = timeline.query_one("#timeline-axis").render_line(0).text
        assert axis.index("╵") == label_width, axis

    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await scenario(pilot)

    asyncio.run(main())
