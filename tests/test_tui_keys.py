"""Keys, the command palette, the user's keymap, and narrow terminals.

Bindings and palette entries are made from one table (``hopscope.tui.commands``): these
tests check that every key's action has an entry, run every entry through the real
palette with the pilot and look at what it did, remap keys through a real config file,
and draw the UI at small sizes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hopscope.app.cli import main
from hopscope.tracing.records import new_span_id, new_trace_id, to_events
from hopscope.tracing.tracefile import load
from hopscope.tui.app import HopscopeApp
from hopscope.tui.commands import COMMANDS, PALETTE
from hopscope.tui.help import HelpScreen
from hopscope.tui.keymap import ENV, ConfigError, binding_ids, load_keymap
from hopscope.tui.replay_view import EditScreen, TargetScreen
from hopscope.tui.request_list import Columns, RequestList
from hopscope.tui.save import write_trace_file
from hopscope.tui.source import PlaybackSource, QueueSource
from textual.command import CommandList, CommandPalette
from textual.pilot import Pilot
from textual.widgets import Input, Static
from textual.widgets._footer import FooterKey
from uitools import text_of, wait_for

Event = dict[str, Any]
SECOND = 1_000_000_000
#: Keys that only move the list's cursor: a palette entry for them would do nothing
#: useful (the palette has the focus while it is open).
CURSOR_ONLY = {"cursor-up", "cursor-down", "page-up", "page-down"}


@pytest.fixture(autouse=True)
def no_user_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The apps read the user's config file: point them at none."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))


def events_for(n: int, t: int, *, status: int = 200, path: str | None = None) -> list[Event]:
    path = path or f"/items/{n}"
    attrs = {
        "http.request.method": "GET",
        "url.scheme": "http",
        "url.path": path,
        "server.address": "127.0.0.1",
        "server.port": 80,
        "http.request.headers": [(b"host", b"127.0.0.1")],
        "http.response.status_code": status,
        "http.response.body.size": 12,
    }
    ids = (new_trace_id(), new_span_id(), 0)
    record = ("c", t, t + 2_000_000 + n * 1_000_000, *ids, "app", f"GET {path}", 1, attrs)
    return to_events(record, {"process.pid": 1})


def many(count: int, t: int | None = None, **options: Any) -> list[Event]:
    t = time.time_ns() if t is None else t
    return [e for n in range(count) for e in events_for(n, t + n * SECOND // 2, **options)]


def run(app: HopscopeApp, scenario: Callable[[Pilot[None]], Awaitable[None]], size: Any) -> None:
    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await scenario(pilot)

    asyncio.run(main())


def _prompt(hits: CommandList, index: int) -> str:
    prompt = hits.get_option_at_index(index).prompt
    return str(getattr(prompt, "plain", prompt))


async def from_palette(app: HopscopeApp, pilot: Pilot[None], title: str) -> None:
    """Open the palette (ctrl+p's action), look ``title`` up, run the top hit with enter."""
    app.action_command_palette()
    await wait_for(
        pilot, lambda: CommandPalette.is_open(app) and app.screen.query(CommandList), "the palette"
    )
    palette = app.screen
    palette.query_one(Input).value = title
    hits = palette.query_one(CommandList)

    def top_hit() -> bool:
        if not hits.option_count or hits.highlighted is None:
            return False
        return _prompt(hits, 0).splitlines()[0] == title

    await wait_for(pilot, top_hit, f"{title!r} on top")
    await pilot.press("enter")
    await wait_for(pilot, lambda: not CommandPalette.is_open(app), "the palette to close")
    await pilot.pause()


# -- one table ----------------------------------------------------------------------------


def test_every_binding_has_an_id_and_every_action_a_palette_entry() -> None:
    app_bindings = [b for b in HopscopeApp.BINDINGS if not isinstance(b, tuple)]
    list_bindings = [b for b in RequestList.BINDINGS if not isinstance(b, tuple)]
    assert len(app_bindings) == len(HopscopeApp.BINDINGS)
    ids = [b.id for b in app_bindings + list_bindings]
    assert None not in ids and len(ids) == len(set(ids))
    palette_actions = {action for _, action, _ in PALETTE}
    by_id = {command.id: command for command in COMMANDS}
    for binding in app_bindings:
        assert binding.action in palette_actions, binding
    for binding in list_bindings:
        assert binding.id is not None
        if binding.id in CURSOR_ONLY:
            continue
        command = by_id[binding.id]
        # The list's own action, or the app's action of the same name.
        assert command.app_action in palette_actions, binding
    # The replay and playback keys the palette once missed.
    for key in ("r", "m", "e", "full_stop", "left_square_bracket", "right_square_bracket"):
        (binding,) = [b for b in app_bindings if key in b.key.split(",")]
        assert binding.action in palette_actions, key
    for title, action, _ in PALETTE:
        assert callable(getattr(HopscopeApp, f"action_{action.split('(')[0]}", None)), title
    titles = [title for title, _, _ in PALETTE]
    assert len(titles) == len(set(titles))


def _selected(app: HopscopeApp) -> str | None:
    trace = app.selected_trace
    return trace.path if trace is not None else None


def test_every_palette_entry_does_its_action(tmp_path: Path) -> None:
    """Each entry, run from the real palette, has the effect its key has."""
    saved = tmp_path / "saved.jsonl"
    source = QueueSource("live test")
    app = HopscopeApp(source, save_path=str(saved))
    done: list[str] = []

    async def modal(pilot: Pilot[None], title: str, screen: type) -> None:
        await from_palette(app, pilot, title)
        await wait_for(pilot, lambda: isinstance(app.screen, screen), title)
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, screen), f"{title} closed")

    async def entry(pilot: Pilot[None], title: str) -> None:
        await from_palette(app, pilot, title)
        done.append(title)

    async def scenario(pilot: Pilot[None]) -> None:
        source.push(many(20, status=200) + many(2, status=503, t=time.time_ns() + 60 * SECOND))
        await wait_for(pilot, lambda: len(app.store) == 22, "the requests")
        assert app.request_list.page_rows < 20  # so going to the oldest scrolls
        await pilot.press("up")
        await wait_for(pilot, lambda: app.selected_trace is not None, "a selection")

        for tab in ("timeline", "request", "response", "logs", "error", "raw"):
            await entry(pilot, f"view: {tab} tab")
            assert app.detail.tabs.active == tab
        await entry(pilot, "view: details of the selected request")
        assert app.focused is not None and app.detail in app.focused.ancestors_with_self
        await entry(pilot, "view: back to the request list")
        assert app.request_list.has_focus

        await entry(pilot, "view: go to the oldest request")
        assert app.request_list.scroll_y == 0 and not app.request_list.follow
        await entry(pilot, "view: follow newest requests")
        assert app.request_list.follow

        app._search = "/items/1"
        await entry(pilot, "view: older search match")
        assert _selected(app) == "/items/19"
        await entry(pilot, "view: older search match")
        assert _selected(app) == "/items/18"
        await entry(pilot, "view: newer search match")
        assert _selected(app) == "/items/19"
        await entry(pilot, "view: search")
        assert app.query_bar.search_input.has_focus
        app.request_list.focus()
        await entry(pilot, "view: filter requests")
        assert app.query_bar.filter_input.has_focus
        app.request_list.focus()

        assert app.apply_filter("status:5xx") and len(app.store) == 2
        await entry(pilot, "export: save filtered requests")
        await wait_for(pilot, saved.exists, "the filtered file")
        await app.workers.wait_for_complete()
        assert len(load(saved, strict=True)) == 2
        saved.unlink()
        await entry(pilot, "view: clear the filter")
        assert app.store.filter is None and len(app.store) == 22
        await entry(pilot, "export: save trace file")
        await wait_for(pilot, saved.exists, "the whole file")
        await app.workers.wait_for_complete()
        assert len(load(saved, strict=True)) == 22

        await pilot.press("up")
        await wait_for(pilot, lambda: app.selected_trace is not None, "a selection")
        await entry(pilot, "export: copy request as curl")
        assert app.clipboard.startswith("curl ")
        await entry(pilot, "export: copy request as HTTPie")
        assert app.clipboard.startswith("http ")
        await entry(pilot, "export: copy request as httpx")
        assert "import httpx" in app.clipboard

        selected = app.selected_trace
        assert selected is not None
        await entry(pilot, "replay: mark or unmark the request")
        assert app.marked == {selected.trace_id}
        await modal(pilot, "replay: resend the request", TargetScreen)
        done.append("replay: resend the request")
        await modal(pilot, "replay: edit and send the request", EditScreen)
        done.append("replay: edit and send the request")
        await modal(pilot, "view: keys and help", HelpScreen)
        done.append("view: keys and help")

        await entry(pilot, "view: pause or resume")
        assert app.paused
        await entry(pilot, "view: pause or resume")
        assert not app.paused
        for title in ("playback: next request", "playback: 10 s back", "playback: 10 s on"):
            app.clear_notifications()
            await entry(pilot, title)  # no playback here: the entry says what it needs
            assert any("needs a playback" in n.message for n in app._notifications), title

        await entry(pilot, "view: clear all requests")
        assert len(app.store) == 0 and app.selected_trace is None
        await entry(pilot, "app: quit")
        await wait_for(pilot, lambda: not app.is_running, "the app to end")

    run(app, scenario, (80, 24))
    assert set(done) == {title for title, _, _ in PALETTE}


def test_playback_entries_step_and_seek_a_playback() -> None:
    t = 1_700_000_000 * SECOND
    events = many(5, t=t)  # one request every half second
    source = PlaybackSource(events, "rec")
    source.pause()
    app = HopscopeApp(source)

    async def scenario(pilot: Pilot[None]) -> None:
        await from_palette(app, pilot, "playback: next request")
        await wait_for(pilot, lambda: len(app.store) == 1, "the stepped request")
        assert source.paused
        await from_palette(app, pilot, "playback: 10 s on")
        await wait_for(pilot, lambda: len(app.store) == 5, "the rest, 10 s on")
        await from_palette(app, pilot, "playback: 10 s back")
        await wait_for(pilot, lambda: len(app.store) == 1, "back at the start")

    run(app, scenario, (100, 30))


# -- the user's keymap ------------------------------------------------------------------------


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_keymap_file_is_read_from_the_usual_places(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_keymap() == {}  # no file: no keymap
    xdg = tmp_path / "xdg"
    (xdg / "hopscope").mkdir(parents=True)
    (xdg / "hopscope" / "config.toml").write_text('[keys]\npause = "p"\n')
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    assert load_keymap() == {"pause": "p"}
    named = _config(tmp_path, '[keys]\nsearch = ["s", "ctrl+f"]\nquit = "ctrl+q, Q"\n')
    monkeypatch.setenv(ENV, str(named))
    assert load_keymap() == {"search": "s,ctrl+f", "quit": "ctrl+q,Q"}
    monkeypatch.setenv(ENV, str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_keymap()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[keys]\nquit = "q"\npuase = "p"\n', "puase: no such binding id"),
        ('[keys]\npause = "ctlr+p"\n', "unknown modifier 'ctlr'"),
        ('[keys]\npause = "escpae"\n', "unknown key 'escpae'"),
        ('[keys]\npause = ""\n', "an empty key"),
        ("[keys]\npause = 3\n", 'give keys as "a,b"'),
        ('[keys]\nsearch = "q"\n', "'q' is bound to both quit and search"),
        ('[keys]\npause = "p"\n[colours]\na = 1\n', "unknown setting 'colours'"),
        ('keys = "p"\n', "'keys' must be a table"),
        ("[keys\n", "not valid TOML"),
    ],
    ids=["id", "modifier", "key", "empty", "type", "clash", "setting", "table", "toml"],
)
def test_bad_config_is_one_line_exit_1_and_no_ui(tmp_path: Path, text: str, fragment: str) -> None:
    path = _config(tmp_path, text)
    with pytest.raises(ConfigError, match="^" + str(path)):
        load_keymap(path)
    trace = tmp_path / "saved.jsonl"
    write_trace_file(str(trace), many(1))
    result = CliRunner().invoke(main, ["view", "--ui", str(trace)], env={ENV: str(path)})
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert "Traceback" not in result.output
    # Without the UI the keys do not matter.
    result = CliRunner().invoke(main, ["view", "--headless", str(trace)], env={ENV: str(path)})
    assert result.exit_code == 0, result.output


def test_remapped_keys_work_and_show_in_footer_help_and_palette(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _config(
        tmp_path,
        '[keys]\npause = "p"\nmark = "x"\nquit = "ctrl+q"\ntab-raw = "R,f6"\n'
        'cursor-up = "up,i"\nhelp-close = "escape,h"\n',
    )
    monkeypatch.setenv(ENV, str(path))
    source = QueueSource("live test")
    app = HopscopeApp(source)  # reads the config file itself

    async def scenario(pilot: Pilot[None]) -> None:
        source.push(many(3))
        await wait_for(pilot, lambda: len(app.store) == 3, "the requests")
        await pilot.press("i")  # the list's cursor, remapped too
        await wait_for(pilot, lambda: app.selected_trace is not None, "a selection")
        await pilot.press("p")
        assert app.paused
        await pilot.press("space")  # no longer bound
        assert app.paused
        await pilot.press("p")
        assert not app.paused
        await pilot.press("x")
        assert len(app.marked) == 1
        await pilot.press("R")
        assert app.detail.tabs.active == "raw"
        await pilot.press("q")  # freed: quit is ctrl+q now
        assert app.is_running

        footer = {key.description: key.key_display for key in app.query(FooterKey)}
        assert footer["Pause"] == "p" and footer["Quit"] == "^q", footer

        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), "help")
        help_text = text_of(app.screen.query_one("#help-content", Static).content)
        help_lines = help_text.splitlines()
        assert any("Pause" in line and line.split()[0] == "p" for line in help_lines)
        assert any("raw" in line.lower() and "R, f6" in line for line in help_lines)
        assert any(line.split()[:2] == ["↑,", "i"] for line in help_lines), help_text
        assert "tab-raw" in help_text and "quit-ctrl-c" in help_text
        await pilot.press("h")  # the help screen's own close key, remapped
        await wait_for(pilot, lambda: not isinstance(app.screen, HelpScreen), "help closed")

        await pilot.press("ctrl+p")
        await wait_for(pilot, lambda: CommandPalette.is_open(app), "the palette")
        app.screen.query_one(Input).value = "view: pause or resume"
        hits = app.screen.query_one(CommandList)
        await wait_for(
            pilot,
            lambda: hits.option_count and _prompt(hits, 0).startswith("view: pause or resume\n"),
            "the hit",
        )
        assert "(p)" in _prompt(hits, 0), _prompt(hits, 0)
        await pilot.press("escape")
        await wait_for(pilot, lambda: not CommandPalette.is_open(app), "the palette closed")

        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: not app.is_running, "ctrl+q to quit")

    run(app, scenario, (120, 35))


def _footer_keys(keymap: dict[str, str]) -> list[tuple[str, str]]:
    """The footer's (action, key) pairs, left to right, for an app with ``keymap``."""
    app = HopscopeApp(QueueSource("live test"), keymap=keymap)
    shown: list[tuple[str, str]] = []

    async def scenario(pilot: Pilot[None]) -> None:
        await wait_for(pilot, lambda: app.query(FooterKey), "the footer")
        await pilot.pause()
        keys = sorted(app.query(FooterKey), key=lambda key: key.region.x)
        shown.extend((key.action, key.key) for key in keys)

    run(app, scenario, (200, 30))
    return shown


def test_remapped_keys_keep_their_place_in_the_footer() -> None:
    default = _footer_keys({})
    remapped = _footer_keys({"search": "ctrl+f", "pause": "p", "quit": "ctrl+q"})
    actions = [action for action, _ in default]
    # "search" and "pause" sit in the middle by default: remapped, Textual's keymap
    # would move them (and quit, the first) to the end.
    assert actions.index("focus_search") < actions.index("toggle_pause") < len(actions) - 2, default
    assert [action for action, _ in remapped] == actions, remapped
    keys = dict(remapped)
    assert (keys["focus_search"], keys["toggle_pause"], keys["quit"]) == ("ctrl+f", "p", "ctrl+q")


@pytest.mark.parametrize(
    "keymap",
    [
        {"search": "ctrl+f", "pause": "p"},
        {"search": "f", "follow": "g"},  # a key passed on
        {"search": "c"},  # a key taken from a binding the keymap leaves alone
        {"help": "h,f2", "cursor-up": "up,i", "quit": "Q"},
    ],
)
def test_in_order_binds_the_keys_textuals_keymap_binds(keymap: dict[str, str]) -> None:
    from hopscope.tui.keymap import in_order
    from textual.app import App
    from textual.binding import BindingsMap

    for bindings in (HopscopeApp.BINDINGS, RequestList.BINDINGS):
        textual = BindingsMap(bindings)
        textual.apply_keymap(App._normalize_keymap(keymap))
        ours = in_order(BindingsMap(bindings), keymap)
        assert {(key, b.id) for key, b in ours} == {(key, b.id) for key, b in textual}
        kept = {b.id for _, b in ours}
        default = dict.fromkeys(b.id for _, b in BindingsMap(bindings) if b.id in kept)
        assert list(dict.fromkeys(b.id for _, b in ours)) == list(default)  # the same order


def test_every_id_in_the_help_screen_is_one_the_keymap_takes() -> None:
    ids = binding_ids()
    for command in COMMANDS:
        if command.keys:
            assert ids[command.id] == command.keys
    assert {"help-close", "dialog-cancel", "edit-send", "compare-close"} <= set(ids)


# -- narrow terminals ---------------------------------------------------------------------------


def test_columns_fit_the_width_dropping_size_then_time() -> None:
    for width in range(20, 200):
        columns = Columns.fit(width)
        parts = [columns.time, columns.method, columns.path, columns.status, columns.duration]
        parts += [columns.size, columns.waterfall]
        used = sum(part + 1 for part in parts if part)
        assert used <= width or columns.path == 4, width
        assert columns.method and columns.status and columns.duration, width
        if columns.time == 0:
            assert columns.size == 0, width  # the size goes first
        if width >= 40:
            assert columns.path >= 16, width
        if width < 70:
            assert columns.waterfall == 0, width
    assert Columns.fit(38).time == 0 and Columns.fit(58).time == 12
    assert Columns.fit(50).size == 0 and Columns.fit(50).time == 12


def test_columns_at_118_cells_are_those_of_before() -> None:
    """The default 120-column terminal looks as it did (the snapshots agree)."""
    assert Columns.fit(118) == Columns(time=12, path=40, size=5, waterfall=37)


@pytest.mark.parametrize(
    ("size", "time_shown", "waterfall"),
    [((40, 20), False, False), ((60, 20), True, False), ((120, 40), True, True)],
    ids=["40x20", "60x20", "120x40"],
)
def test_small_terminals_keep_method_status_and_path(
    size: tuple[int, int], time_shown: bool, waterfall: bool
) -> None:
    source = QueueSource("live http://127.0.0.1:8000")
    app = HopscopeApp(source)

    def lines() -> list[str]:
        request_list = app.request_list
        height = request_list.scrollable_content_region.height
        return [request_list.render_line(y).text for y in range(height)]

    async def scenario(pilot: Pilot[None]) -> None:
        t = time.time_ns()
        source.push(many(10, t=t, path="/api/v1/customers/42/orders/latest"))
        source.push(events_for(11, t + 6 * SECOND, status=503, path="/boom"))
        await wait_for(pilot, lambda: len(app.store) == 11, "the requests")
        await pilot.press("up")
        await wait_for(pilot, lambda: app.detail.trace is not None, "the detail")
        await pilot.pause(0.1)
        header, *rows = lines()
        names = ["time", "method", "path", "st"] if time_shown else ["method", "path", "st"]
        assert header.split()[: len(names)] == names, header
        assert ("╵" in header) == waterfall
        last = [row for row in rows if "/boom" in row]
        assert last and "GET" in last[0] and "503" in last[0]
        long_rows = [row for row in rows if "/api/v1/cust" in row]
        assert long_rows and all(" 200 " in row for row in long_rows)
        assert all(len(row) <= size[0] for row in lines())
        assert app.screen.has_class("-narrow") == (size[0] < 70)
        for tab in ("request", "response", "logs", "error", "raw", "timeline"):
            app.detail.tabs.active = tab  # every tab draws at this size
            await pilot.pause()
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), "help")
        await pilot.press("escape", "down")
        assert app.is_running

    run(app, scenario, size)


# -- dialogs and hints follow the keymap ----------------------------------------------------------


def test_the_save_dialog_cancels_with_the_remapped_dialog_key() -> None:
    from hopscope.tui.save import SaveScreen

    assert binding_ids()["dialog-cancel"] == "escape"
    source = QueueSource("live test")
    app = HopscopeApp(source, keymap={"dialog-cancel": "ctrl+g"})

    async def scenario(pilot: Pilot[None]) -> None:
        source.push(many(1))
        await wait_for(pilot, lambda: len(app.store) == 1, "the request")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, SaveScreen), "the save dialog")
        hint = str(app.screen.query_one("#save-hint", Static).content)
        assert "^g to cancel" in hint, hint
        await pilot.press("escape")  # no longer the cancel key
        await pilot.pause()
        assert isinstance(app.screen, SaveScreen)
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: not isinstance(app.screen, SaveScreen), "the dialog closed")
        assert not app.workers  # cancelled: no save started

    run(app, scenario, (100, 30))


def test_the_truncated_body_refusal_names_the_remapped_edit_key() -> None:
    source = QueueSource("live test")
    app = HopscopeApp(source, keymap={"edit-replay": "x"})
    events = events_for(1, time.time_ns(), path="/upload")
    for event in events:  # the body was cut at capture: 5000 bytes sent, none kept
        if "http.request.method" in event.get("attrs", {}):
            event["attrs"]["http.request.body.size"] = 5000

    async def scenario(pilot: Pilot[None]) -> None:
        source.push(events)
        await wait_for(pilot, lambda: len(app.store) == 1, "the request")
        await pilot.press("up", "r")
        await wait_for(pilot, lambda: isinstance(app.screen, TargetScreen), "the target")
        # Port 9 (discard) is never contacted: the refusal comes before any connection.
        app.screen.query_one(Input).value = "http://127.0.0.1:9"
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.replayed, "the result")
        error = app.replayed[0].error or ""
        assert "truncated at capture (x to edit the body)" in error, error

    run(app, scenario, (120, 35))
