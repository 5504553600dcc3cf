"""Every action of the UI in one table: its keys, its footer text and its palette entry.

:data:`COMMANDS` is the single source the key bindings (:func:`bindings`), the command
palette (:data:`PALETTE`, :class:`HopscopeCommands`), the ``?`` screen and the user's
keymap (binding ids) are all made from, so an action cannot have a key and miss a
palette entry, or the other way round.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from textual.binding import Binding, BindingType
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.markup import escape

from .detail import TABS

if TYPE_CHECKING:
    from textual.app import App

__all__ = ["COMMANDS", "PALETTE", "Command", "HopscopeCommands", "bindings", "keys_of"]

Scope = Literal["app", "list"]


@dataclass(frozen=True, slots=True)
class Command:
    """One action: what runs, which keys run it, and how the palette names it."""

    id: str
    """The binding id: what a ``[keys]`` table in the config file remaps."""
    action: str
    """The action the key runs, in its scope (the app, or the request list)."""
    keys: str = ""
    """Default keys, comma separated; empty for palette-only commands."""
    description: str = ""
    """Short name for the footer and the ``?`` screen."""
    title: str = ""
    """The palette entry, ``area: what it does``; empty when another command's entry
    already runs the same action (``ctrl+c`` quits like ``q``) or it only moves the
    cursor, which means nothing from the palette."""
    help: str = ""
    """The palette entry's second line."""
    show: bool = False
    """Shown in the footer."""
    key_display: str | None = None
    scope: Scope = "app"
    palette_action: str | None = None
    """The app action the palette runs, when the key's action lives on the list."""

    @property
    def app_action(self) -> str:
        """What the palette runs on the app."""
        return self.palette_action or self.action

    def binding(self) -> Binding:
        return Binding(
            self.keys,
            self.action,
            self.description,
            show=self.show,
            key_display=self.key_display,
            id=self.id,
        )


def _tab(number: int, tab: str) -> Command:
    helps = {
        "timeline": "Hops and spans of the selected request",
        "request": "Headers, query and body sent",
        "response": "Status, headers and body returned",
        "logs": "Log records emitted while the request ran",
        "error": "Tracebacks of the selected request",
        "raw": "The selected request's events as JSON",
    }
    return Command(
        f"tab-{tab}",
        f"show_tab('{tab}')",
        str(number),
        f"{tab.capitalize()} tab",
        f"view: {tab} tab",
        helps.get(tab, ""),
    )


#: Every action, in the order the palette and the ``?`` screen list them.
COMMANDS: tuple[Command, ...] = (
    Command("quit", "quit", "q", "Quit", "app: quit", "Stop hopscope and what it started", True),
    # Live commands run servers: Ctrl+C stops them as it would without the UI.
    Command("quit-ctrl-c", "quit", "ctrl+c", "Quit"),
    Command(
        "help",
        "help",
        "question_mark,f1",
        "Help",
        "view: keys and help",
        "Every key and mouse action",
        True,
        "?",
    ),
    Command(
        "filter",
        "focus_filter",
        "slash",
        "Filter",
        "view: filter requests",
        "Edit the filter expression",
        True,
        "/",
    ),
    Command("clear-filter", "clear_filter", "", "", "view: clear the filter", "Show every request"),
    Command("search", "focus_search", "s", "Search", "view: search", "Find requests by text", True),
    Command(
        "search-older",
        "search_next(-1)",
        "n",
        "Older match",
        "view: older search match",
        "Select the next match above",
    ),
    Command(
        "search-newer",
        "search_next(1)",
        "N",
        "Newer match",
        "view: newer search match",
        "Select the next match below",
    ),
    Command(
        "pause",
        "toggle_pause",
        "space",
        "Pause",
        "view: pause or resume",
        "Freeze the display (or the playback); events wait meanwhile",
        True,
    ),
    Command(
        "follow",
        "follow",
        "f",
        "Follow",
        "view: follow newest requests",
        "Scroll to the newest request and stay there",
        True,
    ),
    Command(
        "clear",
        "clear",
        "c",
        "Clear",
        "view: clear all requests",
        "Forget every request held",
        True,
    ),
    Command(
        "save",
        "save",
        "ctrl+s",
        "Save",
        "export: save trace file",
        "Write every request held as a trace file (0600)",
        True,
    ),
    Command(
        "save-filtered",
        "save(True)",
        "",
        "",
        "export: save filtered requests",
        "Write only the requests the filter shows",
    ),
    Command(
        "copy-curl",
        "copy_curl",
        "y",
        "Copy curl",
        "export: copy request as curl",
        "Put a curl command for it on the clipboard",
        True,
    ),
    Command(
        "copy-httpie",
        "copy_as('httpie')",
        "",
        "",
        "export: copy request as HTTPie",
        "Put an HTTPie command for it on the clipboard",
    ),
    Command(
        "copy-httpx",
        "copy_as('httpx')",
        "",
        "",
        "export: copy request as httpx",
        "Put a Python httpx script for it on the clipboard",
    ),
    Command(
        "back",
        "to_list",
        "escape",
        "Back to list",
        "view: back to the request list",
        "Move the focus to the list",
    ),
    Command(
        "replay",
        "replay",
        "r",
        "Replay",
        "replay: resend the request",
        "Send the selected request (or the marked ones) again and compare",
    ),
    Command(
        "edit-replay",
        "edit_replay",
        "e",
        "Edit and send",
        "replay: edit and send the request",
        "Change method, URL, headers or body, then send",
    ),
    Command(
        "mark",
        "mark",
        "m",
        "Mark for replay",
        "replay: mark or unmark the request",
        "r then resends every marked request",
    ),
    Command(
        "step",
        "step",
        "full_stop",
        "Playback: next request",
        "playback: next request",
        "Pause and play up to the next request (hopscope view --play)",
    ),
    Command(
        "seek-back",
        "seek(-10)",
        "left_square_bracket",
        "Playback: 10 s back",
        "playback: 10 s back",
        "Play again from 10 seconds earlier",
    ),
    Command(
        "seek-forward",
        "seek(10)",
        "right_square_bracket",
        "Playback: 10 s on",
        "playback: 10 s on",
        "Jump 10 seconds ahead in the recording",
    ),
    *(_tab(number, tab) for number, tab in enumerate(TABS, start=1)),
    # The request list's own keys (they act on the list, which has the focus).
    Command("cursor-up", "cursor(-1)", "up,k", "Previous", scope="list"),
    Command("cursor-down", "cursor(1)", "down,j", "Next", scope="list"),
    Command("page-up", "page(-1)", "pageup", "Page up", scope="list"),
    Command("page-down", "page(1)", "pagedown", "Page down", scope="list"),
    Command(
        "oldest",
        "first",
        "home,g",
        "Oldest",
        "view: go to the oldest request",
        "Scroll to the top of the list",
        scope="list",
        palette_action="list_first",
    ),
    Command("newest", "follow", "end,G", "Follow", scope="list"),
    Command(
        "details",
        "app.focus_detail",
        "enter",
        "Details",
        "view: details of the selected request",
        "Move the focus to the detail tabs",
        scope="list",
        palette_action="focus_detail",
    ),
)


def bindings(scope: Scope) -> list[BindingType]:
    """The key bindings of ``scope``, from :data:`COMMANDS`."""
    return [c.binding() for c in COMMANDS if c.scope == scope and c.keys]


#: ``(title, app action, help)`` of every palette entry.
PALETTE: list[tuple[str, str, str]] = [(c.title, c.app_action, c.help) for c in COMMANDS if c.title]


def key_text(
    command: Command, keymap: Mapping[str, str], display: Callable[[str], str] | None = None
) -> str:
    """The keys that run ``command`` now (the user's keymap wins), as the footer shows them."""
    keys = keymap.get(command.id, command.keys)
    if not keys:
        return ""
    if keys == command.keys and command.key_display:
        return command.key_display
    parts = [key.strip() for key in keys.split(",") if key.strip()]
    return ", ".join(display(key) if display is not None else key for key in parts)


def keys_of(app: App[Any], binding_id: str, default: str) -> str:
    """The key(s) running ``binding_id`` now, for hints in messages: ``default`` unless
    the user's keymap (``app.keymap``) says otherwise."""
    keymap: Mapping[str, str] = getattr(app, "keymap", {})
    keys = [key.strip() for key in keymap.get(binding_id, default).split(",") if key.strip()]
    return "/".join(app.get_key_display(Binding(key, "")) for key in keys)


class HopscopeCommands(Provider):
    """Offers :data:`COMMANDS` to Textual's command palette (ctrl+p), each with its keys."""

    def _entries(self) -> list[tuple[str, str, str]]:
        keymap: Mapping[str, str] = getattr(self.app, "keymap", {})
        app = self.app

        def display(key: str) -> str:
            return app.get_key_display(Binding(key, ""))

        entries = []
        for command in COMMANDS:
            if not command.title:
                continue
            keys = key_text(command, keymap, display)
            help_text = f"{command.help}  ({keys})" if keys else command.help
            # The palette reads help as markup: keys like "[" must stay text.
            entries.append((command.title, command.app_action, escape(help_text)))
        return entries

    async def discover(self) -> Hits:
        for title, action, help_text in self._entries():
            yield DiscoveryHit(title, partial(self.app.run_action, action), help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, action, help_text in self._entries():
            score = matcher.match(title)
            if score > 0:
                yield Hit(
                    score,
                    matcher.highlight(title),
                    partial(self.app.run_action, action),
                    text=title,
                    help=help_text,
                )
