"""The one-line question the UI asks: a field, a hint, enter to accept; and the text
fields every dialog uses.

Saving and resending both ask for one string; one screen keeps their looks and their
cancel key (the shared, remappable ``dialog-cancel`` binding) from drifting apart.

Ctrl+C in a text field copies, as in any Textual app: the selection, or else the whole
field (Textual's own fields do nothing then, and the key fell through to quitting on
the main screen and to nothing at all in a dialog).  It says what it copied.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Input, Static, TextArea

from . import formatting
from .commands import keys_of

__all__ = ["CopyInput", "CopyTextArea", "PromptScreen", "copy_text"]


def copy_text(widget: Widget, selected: str, whole: str, what: str = "the field") -> None:
    """Put ``selected`` on the clipboard, or ``whole`` (``what``) when nothing is
    selected, and say so: a copy that says nothing looks like a key that does nothing."""
    text = selected or whole
    app = widget.app
    if not text:
        app.notify(f"Nothing to copy: {what} is empty.", severity="warning")
        return
    app.copy_to_clipboard(text)
    count = f"{len(text):,} character" + ("" if len(text) == 1 else "s")
    message = f"Copied {'the selection' if selected else what} ({count})."
    if not isinstance(widget.screen, ModalScreen):  # a field of the main screen
        back, quit_keys = keys_of(app, "back", "escape"), keys_of(app, "quit-ctrl-c", "ctrl+c")
        message += f" {back} leaves the field; there {quit_keys} quits."
    app.notify(message)


class CopyInput(Input):
    """An input whose copy key copies the whole value when nothing is selected, and
    that draws a pasted control or bidi character as a visible one (Textual's sends
    it to the terminal as it is: an ESC, or a U+202E turning the field around)."""

    @property
    def _value(self) -> Text:
        text = super()._value
        if not self.password and not text.plain.isprintable():
            text.plain = formatting.one_for_one(text.plain)
        return text

    def action_copy(self) -> None:
        copy_text(self, self.selected_text, self.value)


class CopyTextArea(TextArea):
    """A text area whose copy key copies all of it when nothing is selected, and that
    draws a pasted control or bidi character as a visible one (see :class:`CopyInput`)."""

    def get_line(self, line_index: int) -> Text:
        line = super().get_line(line_index)
        if not line.plain.isprintable():
            line.plain = formatting.one_for_one(line.plain, keep="\t")
        return line

    def action_copy(self) -> None:
        copy_text(self, self.selected_text, self.text)


class PromptScreen(ModalScreen[str | None]):
    """Asks for one line; dismisses with the text, or None when cancelled or left empty."""

    DEFAULT_CSS = """
    PromptScreen { align: center middle; }
    PromptScreen > #prompt-box {
        width: 70; max-width: 95%; height: auto;
        border: round $accent; background: $surface; padding: 0 1;
    }
    PromptScreen .prompt-hint { color: $text-muted; }
    """

    # The id the other dialogs' cancel keys share: one keymap entry remaps them all.
    BINDINGS = [Binding("escape", "cancel", "Cancel", show=False, id="dialog-cancel")]

    def __init__(
        self,
        title: str,
        value: str,
        *,
        accept: str,
        input_id: str,
        hint_id: str,
        placeholder: str = "",
    ) -> None:
        """``accept`` is the verb the hint gives enter; the ids let callers find the fields."""
        super().__init__()
        self._title = title
        self._input = CopyInput(value, placeholder, id=input_id)
        self._accept = accept
        self._hint_id = hint_id

    def compose(self) -> ComposeResult:
        with Vertical(id="prompt-box"):
            yield Static(self._title)
            yield self._input
            cancel = keys_of(self.app, "dialog-cancel", "escape")
            yield Static(
                f"enter to {self._accept}, {cancel} to cancel",
                id=self._hint_id,
                classes="prompt-hint",
            )

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)
