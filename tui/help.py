"""The ``?`` screen: every key, generated from the bindings so it cannot go stale.

The app passes its bindings with the user's keymap applied, so the keys shown are the
keys that work, each with its binding id (what the config file's ``[keys]`` names).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from .commands import keys_of

__all__ = ["HelpScreen"]

MOUSE_HELP = [
    ("click a row", "select the request"),
    ("wheel / scrollbar", "scroll; leaving the bottom pauses follow"),
    ("click a tab", "show that part of the request"),
    ("click ▼ N new", "follow again"),
]

FILTER_HELP = (
    "Filter: type an expression and press Enter (empty shows everything). "
    "A bad expression is marked where it goes wrong and the old filter stays. "
    "Search: finds text in method, path, query, status and route; Enter jumps to the "
    "newest match, n / N to older / newer ones. "
    "Keys: the grey names are binding ids; remap them in a [keys] table of "
    '~/.config/hopscope/config.toml (or $HOPSCOPE_CONFIG), e.g. quit = "ctrl+q".'
)


def _bindings(items: Iterable[BindingType]) -> list[Binding]:
    return [item if isinstance(item, Binding) else Binding(*item) for item in items]


class HelpScreen(ModalScreen[None]):
    """Keys by area, then the mouse, then how filter and search behave."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > #help-box {
        width: 84; max-width: 95%; height: 85%;
        border: round $accent; background: $surface; padding: 0 1;
    }
    HelpScreen #help-title { text-style: bold; height: 1; }
    HelpScreen #help-hint { color: $text-muted; height: 1; }
    """

    BINDINGS = [
        Binding("escape,q,question_mark,f1", "dismiss", "Close", show=False, id="help-close"),
    ]

    def __init__(
        self,
        sections: Sequence[tuple[str, Iterable[BindingType]]],
        filter_help: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__()
        self._sections = [(title, _bindings(items)) for title, items in sections]
        self._filter_help = list(filter_help)

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box"):
            yield Static("hopscope: keys and mouse", id="help-title")
            with VerticalScroll():
                yield Static(self._content(), id="help-content")
            close = keys_of(self.app, "help-close", "escape,q,question_mark,f1")
            yield Static(f"{close} to close", id="help-hint")

    def action_copy_text(self) -> None:
        """Ctrl+C copies what the mouse selected; without a selection it says how to
        close, rather than doing nothing (the key quits only from the main screen)."""
        selected = self.get_selected_text()
        if selected:
            self.app.copy_to_clipboard(selected)
            self.app.notify(f"Copied the selection ({len(selected):,} characters).")
            return
        close = keys_of(self.app, "help-close", "escape,q,question_mark,f1")
        self.app.notify(f"Nothing selected to copy (drag over text first); {close} closes help.")

    def _content(self) -> Group:
        parts: list[Table | Text] = []
        for title, bindings in self._sections:
            table = Table(
                title=title, title_justify="left", title_style="bold", box=None, show_header=False
            )
            table.add_column(style="bold cyan", no_wrap=True, min_width=14)
            table.add_column()
            table.add_column(style="dim", no_wrap=True, justify="right")
            keys_by_action: dict[str, list[str]] = {}
            descriptions: dict[str, str] = {}
            ids: dict[str, list[str]] = {}
            for binding in bindings:
                if not binding.description:
                    continue
                keys = keys_by_action.setdefault(binding.action, [])
                keys += [
                    self.app.get_key_display(Binding(key.strip(), binding.action))
                    for key in binding.key.split(",")
                ]
                descriptions.setdefault(binding.action, binding.tooltip or binding.description)
                if binding.id:
                    ids.setdefault(binding.action, []).append(binding.id)
            for action, keys in keys_by_action.items():
                table.add_row(
                    ", ".join(dict.fromkeys(keys)),
                    descriptions[action],
                    " ".join(ids.get(action, [])),
                )
            parts += [table, Text()]
        mouse = Table(
            title="Mouse", title_justify="left", title_style="bold", box=None, show_header=False
        )
        mouse.add_column(style="bold cyan", no_wrap=True, min_width=14)
        mouse.add_column()
        for what, does in MOUSE_HELP:
            mouse.add_row(what, does)
        parts += [mouse, Text(), Text(FILTER_HELP, style="dim")]
        if self._filter_help:
            language = Table(
                title="Filter expressions",
                title_justify="left",
                title_style="bold",
                box=None,
                show_header=False,
            )
            language.add_column(style="bold cyan", overflow="fold", max_width=36)
            language.add_column(overflow="fold")
            for written, meaning in self._filter_help:
                language.add_row(written, meaning)
            parts += [Text(), language]
        return Group(*parts)
