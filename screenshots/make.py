"""Make the README's screenshots of the UI from a real run of ``hopscope demo``.

The demo runs headless as a user would run it (``hopscope demo --headless --requests
12 -o FILE``); its recording is then streamed into the UI, under Textual's pilot, as the
live demo would stream it, cut while its last request is still running (the UI's clock
is stopped at that moment, so the running request's bar is drawn as it was then).  Each
view is reached by pressing keys, saved as SVG (Textual's ``save_screenshot``) and
converted to PNG with cairosvg.

Needs the Fira Code font (Textual's SVG asks for it) and DejaVu Sans Mono for the few
symbols Fira Code lacks, plus cairosvg::

    apt-get install -y fonts-firacode fonts-dejavu-core
    pip install cairosvg
    python screenshots/make.py          # writes screenshots/{list,timeline,error,filter}.{svg,png}
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import hopscope
import hopscope.tracing
from hopscope.tracing.tracefile import TraceFileError, read_events
from hopscope.tui.app import HopscopeApp
from hopscope.tui.source import QueueSource
from rich.cells import cell_len
from textual.pilot import Pilot
from textual.widgets import Input

HERE = Path(__file__).resolve().parent
# The demo's recording and where to cut it, shared with the snapshot tests.
sys.path.insert(0, str(HERE.parent / "tests" / "data"))
from make_demo_trace import cut, record  # noqa: E402

REQUESTS = 12
WAIT = 20.0
#: Fonts tried, in order, for text runs with a symbol Fira Code has no glyph for.
FALLBACK_FONTS = ("DejaVu Sans Mono", "DejaVu Sans")

Event = dict[str, Any]
View = Callable[[HopscopeApp, Pilot[None]], Awaitable[None]]


# -- the recording ---------------------------------------------------------------------


def tidy(events: list[Event]) -> list[Event]:
    """Tracebacks name files where this machine installed them: say ``.../site-packages``
    as a pip install would, not where a developer's checkout or venv happens to be."""
    paths = sysconfig.get_paths()
    site = ".../site-packages"
    # Where hopscope's own files are: a strict editable install's link folder, or the
    # checkout itself with a plain ``pip install -e .`` (whose ``hopscope.__path__`` is
    # an import-hook name, not a folder: its parent would be ".", every dot replaced).
    package = str(Path(hopscope.tracing.__file__).parent.parent)
    places = {
        package: f"{site}/hopscope",
        paths["purelib"]: site,
        paths["platlib"]: site,
        paths["stdlib"]: f".../lib/python{sys.version_info.major}.{sys.version_info.minor}",
    }
    text = json.dumps(events)
    for place in sorted(places, key=len, reverse=True):
        if not Path(place).is_absolute():
            continue
        text = text.replace(json.dumps(place)[1:-1], places[place])
    return list(json.loads(text))


def stream(path: Path) -> tuple[list[Event], int, str]:
    """The recording up to the cut (where the snapshot tests cut theirs), the moment of
    the cut, and the demo's public URL."""
    events = tidy(sorted(read_events(path), key=lambda event: event["ts"]))
    try:
        events, now = cut(events)
    except ValueError as exc:
        sys.exit(f"make.py: {exc}: change the cut")
    first = next(e for e in events if e["kind"] == "span_start")
    url = f"http://127.0.0.1:{first['attrs'].get('server.port', 0)}"
    return events, now, url


# -- the views ---------------------------------------------------------------------------


async def wait_for(pilot: Pilot[None], condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"make.py: timed out waiting for {what}")
        await pilot.pause(0.05)


async def search(app: HopscopeApp, pilot: Pilot[None], text: str, *keys: str) -> None:
    await pilot.press("s", *text, "enter", *keys)
    await wait_for(pilot, lambda: app.detail.trace is app.selected_trace, "the detail pane")


async def list_view(app: HopscopeApp, pilot: Pilot[None]) -> None:
    """The list, the running request selected: its timeline grows as it runs."""
    await pilot.press("up")
    await wait_for(pilot, lambda: app.detail.trace is not None, "the selection")


async def timeline_view(app: HopscopeApp, pilot: Pilot[None]) -> None:
    """GET /api/slow through every hop, its first database query highlighted."""
    await search(app, pilot, "/api/slow", "n")
    names = [span.name for _, span in app.detail.timeline.rows]
    app.detail.timeline.spans_list.focus()
    await pilot.press(*["down"] * names.index("db.query"))


async def error_view(app: HopscopeApp, pilot: Pilot[None]) -> None:
    """The 500: GET /api/boom's traceback."""
    await search(app, pilot, "/api/boom", "5")


async def filter_view(app: HopscopeApp, pilot: Pilot[None]) -> None:
    """A filter in force (a request it kept selected), and a typo in the next one."""
    await pilot.press("slash", *"duration>50ms", "enter", "up")
    await wait_for(pilot, lambda: app.detail.trace is not None, "the selection")
    await pilot.press("slash", "end", *" and stauts:200", "enter")
    await wait_for(pilot, lambda: app.query_bar.has_error, "the filter error")


VIEWS: dict[str, View] = {
    "list": list_view,
    "timeline": timeline_view,
    "error": error_view,
    "filter": filter_view,
}


async def shoot(
    name: str, view: View, events: list[Event], now: int, url: str, size: tuple[int, int]
) -> Path:
    source = QueueSource(f"demo {url}")
    source.push(events)
    app = HopscopeApp(source, title="hopscope demo", clock=lambda: now)
    requests = len({e["trace_id"] for e in events})
    async with app.run_test(size=size) as pilot:
        for field in app.query(Input):
            field.cursor_blink = False
        await wait_for(pilot, lambda: app.store.total == requests, "every request")
        await view(app, pilot)
        await pilot.pause(0.3)  # a few ticks: header and status line
        await pilot.wait_for_scheduled_animations()
        return Path(app.save_screenshot(f"{name}.svg", str(HERE)))


# -- PNG -----------------------------------------------------------------------------------


def _context(family: str, size: float, scale: float = 1.0) -> Any:
    """A cairo context set up as cairosvg sets it up to draw text."""
    import cairocffi as cairo

    context = cairo.Context(cairo.ImageSurface(cairo.FORMAT_A8, 1, 1))
    context.scale(scale, scale)
    context.select_font_face(family)
    context.set_font_size(size)
    return context


def _missing(family: str, text: str) -> bool:
    """Whether cairo draws any character of ``text`` in ``family`` as a box."""
    scaled = _context(family, 20).get_scaled_font()
    return any(glyph[0] == 0 for glyph in scaled.text_to_glyphs(0, 0, text, False))


def _font_size(size: float, cell: float, scale: float) -> float:
    """The smallest size from ``size`` up whose advance fills a ``cell`` (user units).

    Advances are hinted to whole device pixels: a block character narrower than its
    cell would leave a seam in every bar.
    """
    while _context("Fira Code", size, scale).text_extents("M")[4] < cell - 1e-6:
        size += 0.05
    return round(size, 2)


def _attribute(opening: str, name: str) -> str | None:
    found = re.search(rf'\s{name}="([^"]*)"', opening)
    return found.group(1) if found else None


#: Left-aligned block elements (bars), by the part of a cell they fill.
BLOCKS = {"█": 8, "▉": 7, "▊": 6, "▋": 5, "▌": 4, "▍": 3, "▎": 2, "▏": 1}


def for_cairo(svg: str, scale: float) -> str:
    """Textual's SVG made to come out of cairosvg as it comes out of a browser.

    A browser stretches each run of text to its cells (``textLength``) and falls back
    to another font for a symbol its font lacks; cairosvg does neither.  So each
    character gets its own ``x`` and the font is made just wide enough to fill a cell;
    bars (block elements) become rectangles, which meet without the seams glyphs leave
    between them; and runs with a symbol Fira Code lacks get a font that has it.
    """
    lines = {
        found.group(1): (float(found.group(2)), float(found.group(3)))
        for found in re.finditer(
            r'<clipPath id="([^"]+)">\s*<rect x="[^"]*" y="([^"]+)" width="[^"]*" '
            r'height="([^"]+)"',
            svg,
        )
    }
    fonts: dict[str, str | None] = {}
    cells: list[float] = []

    def fix(match: re.Match[str]) -> str:
        opening, content = match.group(1), match.group(2)
        text = html.unescape(content)
        x, length = _attribute(opening, "x"), _attribute(opening, "textLength")
        if x is None or length is None or not text:
            return match.group(0)
        cell = float(length) / max(cell_len(text), 1)
        cells.append(cell)
        clip = re.search(r'clip-path="url\(#([^)]+)\)"', opening)
        if clip and clip.group(1) in lines and set(text) <= BLOCKS.keys():
            top, height = lines[clip.group(1)]
            return _rectangles(
                _attribute(opening, "class") or "", float(x), cell, text, top, height
            )
        positions = [f"{float(x) + cell * cell_len(text[:i]):.2f}" for i in range(len(text))]
        opening = opening.replace(f' x="{x}"', f' x="{" ".join(positions)}"', 1)
        symbols = "".join(sorted({c for c in text if ord(c) > 0x2000}))
        if symbols:
            if symbols not in fonts:
                fonts[symbols] = None
                if _missing("Fira Code", symbols):
                    fonts[symbols] = next(
                        (font for font in FALLBACK_FONTS if not _missing(font, symbols)), None
                    )
            font = fonts[symbols]
            if font is not None:
                opening += f' font-family="{font}"'
        return f"{opening}>{content}</text>"

    svg = re.sub(r"(<text\b[^>]*?)>([^<]*)</text>", fix, svg)
    matrix = re.search(r"(\.terminal-[\w-]*matrix \{[^}]*?font-size: )([\d.]+)px", svg)
    if matrix and cells:
        size = _font_size(float(matrix.group(2)), max(cells), scale)
        svg = svg[: matrix.start(2)] + str(size) + svg[matrix.end(2) :]
    return svg


def _rectangles(css_class: str, x: float, cell: float, text: str, top: float, height: float) -> str:
    """A run of block elements as the rectangles they draw (full blocks merged)."""
    shapes = []
    at = x
    for full_run in re.finditer("█+|[^█]", text):
        run = full_run.group(0)
        width = cell * len(run) if run[0] == "█" else cell * BLOCKS[run] / 8
        shapes.append(
            f'<rect class="{css_class}" x="{at:.2f}" y="{top}" width="{width:.2f}" '
            f'height="{height}" shape-rendering="crispEdges"/>'
        )
        at += cell * len(run)
    return "".join(shapes)


def to_png(svg_path: Path, scale: float) -> Path:
    import cairosvg

    png_path = svg_path.with_suffix(".png")
    svg = for_cairo(svg_path.read_text(encoding="utf-8"), scale)
    cairosvg.svg2png(bytestring=svg.encode(), write_to=str(png_path), scale=scale)
    return png_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="120x35", help="terminal COLUMNSxROWS")
    parser.add_argument("--scale", type=float, default=1.25, help="PNG scale (1: 12px cells)")
    parser.add_argument("--trace", type=Path, help="use this recording instead of a new one")
    parser.add_argument("views", nargs="*", metavar="VIEW", help=f"of {', '.join(VIEWS)}")
    options = parser.parse_args()
    unknown = [name for name in options.views if name not in VIEWS]
    if unknown:
        parser.error(f"unknown view {unknown[0]!r}: choose from {', '.join(VIEWS)}")
    size = re.fullmatch(r"(\d+)x(\d+)", options.size)
    if size is None:
        parser.error(f"--size {options.size!r}: expected COLUMNSxROWS, e.g. 120x35")
    columns, rows = int(size.group(1)), int(size.group(2))
    try:
        with tempfile.TemporaryDirectory() as folder:
            trace = options.trace
            if trace is None:
                trace = Path(folder) / "demo.jsonl"
                record(trace, REQUESTS)
            events, now, url = stream(trace)
    except (TraceFileError, subprocess.SubprocessError) as exc:
        sys.exit(f"make.py: {exc}")
    for name in options.views or VIEWS:
        svg = asyncio.run(shoot(name, VIEWS[name], events, now, url, (columns, rows)))
        png = to_png(svg, options.scale)
        print(f"wrote {os.path.relpath(svg)} and {png.name}")


if __name__ == "__main__":
    main()
