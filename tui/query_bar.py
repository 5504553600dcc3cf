"""The filter and search inputs, and the line that shows where a filter is wrong."""

from __future__ import annotations

from rich.cells import cell_len
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Input, Static

from . import formatting
from .prompt import CopyInput

__all__ = ["QueryBar"]

FILTER_LABEL = "filter "


class QueryBar(Vertical):
    """``filter [expression]  search [text]``, plus an error line when needed."""

    DEFAULT_CSS = """
    QueryBar { height: auto; }
    QueryBar > #query-row { height: 1; }
    QueryBar .query-label { width: auto; color: $text-muted; }
    QueryBar #filter-input { width: 2fr; }
    QueryBar #search-input { width: 1fr; }
    QueryBar #search-label { margin-left: 2; }
    QueryBar > #filter-error { height: auto; color: $error; display: none; }
    QueryBar > #filter-error.-shown { display: block; }
    """

    def compose(self) -> ComposeResult:
        with Horizontal(id="query-row"):
            yield Static(FILTER_LABEL, classes="query-label", id="filter-label")
            yield CopyInput(
                placeholder="e.g. status:5xx and path:/api/*   (/ to edit, enter to apply)",
                id="filter-input",
                compact=True,
            )
            yield Static("search ", classes="query-label", id="search-label")
            yield CopyInput(placeholder="text  (s, then n / N)", id="search-input", compact=True)
        yield Static("", id="filter-error")

    @property
    def filter_input(self) -> Input:
        return self.query_one("#filter-input", Input)

    @property
    def search_input(self) -> Input:
        return self.query_one("#search-input", Input)

    @property
    def error_line(self) -> Static:
        return self.query_one("#filter-error", Static)

    def show_error(self, expression: str, position: int, message: str) -> None:
        """The expression again, a caret under ``position``, then the message."""
        indent = " " * len(FILTER_LABEL)
        position = max(0, min(position, len(expression)))
        text = Text(no_wrap=True, overflow="ellipsis", end="")
        text.append(indent + formatting.printable(expression) + "\n", style="")
        # Under the character in cells: a wide (CJK) character before it takes two, an
        # escaped control character several.
        before = formatting.printable(expression[:position])
        text.append(indent + " " * cell_len(before) + "^\n", style="bold")
        text.append(indent + formatting.printable(message))
        self.error_line.update(text)
        self.error_line.add_class("-shown")

    def clear_error(self) -> None:
        self.error_line.update("")
        self.error_line.remove_class("-shown")

    @property
    def has_error(self) -> bool:
        return self.error_line.has_class("-shown")
