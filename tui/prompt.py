"""The one-line question the UI asks: a field, a hint, enter to accept.

Saving and resending both ask for one string; one screen keeps their looks and their
cancel key (the shared, remappable ``dialog-cancel`` binding) from drifting apart.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from .commands import keys_of

__all__ = ["PromptScreen"]


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
        self._input = Input(value, placeholder, id=input_id)
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
