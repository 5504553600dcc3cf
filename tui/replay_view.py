"""The screens of resending from the UI: where to, what to send, and what changed."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Group, RenderableType
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, Static, TextArea

from . import formatting
from .commands import keys_of
from .prompt import CopyInput, CopyTextArea, PromptScreen, copy_text
from .resend import Outgoing, Resent

__all__ = ["ComparisonScreen", "EditScreen", "TargetScreen", "render_comparison"]

#: Body bytes shown per side; the rest is summarised.
BODY_SHOWN = 8_000


class TargetScreen(PromptScreen):
    """Asks where to resend; dismisses with the target, or None when cancelled."""

    def __init__(self, target: str, count: int) -> None:
        what = "the request" if count == 1 else f"{count} requests"
        super().__init__(
            f"Replay {what} against (http://HOST:PORT or unix:PATH):",
            # A Host header's control characters shown, not sent: such a target is refused.
            formatting.printable(target),
            accept="send",
            input_id="target-input",
            hint_id="target-hint",
        )


def _headers_text(headers: Sequence[tuple[str, str]]) -> str:
    return "\n".join(formatting.printable(f"{name}: {value}") for name, value in headers)


def parse_headers(text: str) -> list[tuple[str, str]]:
    """``Name: value`` lines (blank lines and lines without a colon are skipped)."""
    out = []
    for line in text.splitlines():
        name, colon, value = line.partition(":")
        if colon and name.strip():
            out.append((name.strip(), value.strip()))
    return out


class EditScreen(ModalScreen[Outgoing | None]):
    """The request as it will be sent, editable; Ctrl+S sends."""

    DEFAULT_CSS = """
    EditScreen { align: center middle; }
    EditScreen > #edit-box {
        width: 100; max-width: 98%; height: 90%;
        border: round $accent; background: $surface; padding: 0 1;
    }
    EditScreen #edit-line { height: 3; }
    EditScreen #edit-method { width: 14; }
    EditScreen #edit-url { width: 1fr; }
    EditScreen #edit-headers { height: 1fr; }
    EditScreen #edit-body { height: 1fr; }
    EditScreen .edit-label, EditScreen #edit-hint { color: $text-muted; }
    """

    BINDINGS = [
        Binding("escape", "cancel", "Cancel", show=False, id="dialog-cancel"),
        Binding("ctrl+s", "send", "Send", show=False, id="edit-send"),
    ]

    def __init__(self, request: Outgoing) -> None:
        super().__init__()
        self._request = request
        # What the editors show is safe for the terminal (control characters as
        # pictures), so it is not always what was captured: binary bytes, control
        # characters, mixed line ends (the editor makes them one kind), spaces around a
        # header value.  An editor left as it was sends what was captured.
        self._body_text = formatting.printable(request.body.decode("utf-8", "replace"), lines=True)
        self._headers_text = _headers_text(request.headers)
        self._shown = {"edit-body": self._body_text, "edit-headers": self._headers_text}
        """Each editor's text as it showed it at first."""
        # The same for the method and the URL (a captured query can hold raw bytes).
        self._method_text = formatting.printable(request.method)
        self._url_text = formatting.printable(request.url)

    def compose(self) -> ComposeResult:
        request = self._request
        with Vertical(id="edit-box"):
            with Horizontal(id="edit-line"):
                yield CopyInput(self._method_text, id="edit-method")
                yield CopyInput(self._url_text, id="edit-url")
            yield Static("Headers (Name: value, one a line)", classes="edit-label")
            yield CopyTextArea(self._headers_text, id="edit-headers")
            label = "Body"
            if self._body_text.encode("utf-8") != request.body:
                label += " (not plain UTF-8 text: sent as captured unless edited)"
            yield Static(label, classes="edit-label")
            yield CopyTextArea(self._body_text, id="edit-body")
            send, cancel = (
                keys_of(self.app, "edit-send", "ctrl+s"),
                keys_of(self.app, "dialog-cancel", "escape"),
            )
            yield Static(f"{send} to send, {cancel} to cancel, tab to move", id="edit-hint")

    def on_mount(self) -> None:
        for editor in self._shown:
            self._shown[editor] = self.query_one(f"#{editor}", TextArea).text
        self.query_one("#edit-url", Input).focus()

    def edited(self) -> Outgoing:
        request = self._request
        method = self.query_one("#edit-method", Input).value
        method = request.method if method == self._method_text else method.strip().upper()
        url = self.query_one("#edit-url", Input).value
        url = request.url if url == self._url_text else url.strip()
        headers_text = self.query_one("#edit-headers", TextArea).text
        headers = (
            list(request.headers)
            if headers_text == self._shown["edit-headers"]
            else parse_headers(headers_text)
        )
        text = self.query_one("#edit-body", TextArea).text
        body = request.body if text == self._shown["edit-body"] else text.encode("utf-8")
        return Outgoing(method or "GET", url, headers, body, request.uds)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_send()

    def action_send(self) -> None:
        self.dismiss(self.edited())

    def action_cancel(self) -> None:
        self.dismiss(None)


def _body(data: bytes, truncated: bool = False) -> Text:
    if not data:
        return Text("(no body)", style="dim")
    text = formatting.plain(data[:BODY_SHOWN].decode("utf-8", "replace"), lines=True)
    if len(data) > BODY_SHOWN:
        text.append(f"\n… {len(data) - BODY_SHOWN:,} more bytes", style="dim")
    if truncated:
        text.append("\n(truncated at capture)", style="dim")
    return text


def _side(
    title: str,
    status: int | None,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    truncated: bool = False,
) -> RenderableType:
    head = Text(title, style="bold underline")
    status_line = Text(f"status {status if status is not None else '-'}", style="bold")
    said = "\n".join(formatting.printable(f"{n}: {v}") for n, v in headers)
    lines = Text(said or "(no headers)", style="cyan")
    return Group(head, status_line, lines, Text(), _body(body, truncated))


def render_comparison(result: Resent) -> tuple[RenderableType, RenderableType, RenderableType]:
    """``(verdict and differences, captured side, replayed side)``."""
    captured, request = result.captured, result.request
    head = formatting.plain(f"{request.method} {request.url}", style="bold")
    verdict = Text()
    if result.error is not None:
        verdict.append("ERROR ", style="bold #ff5f5f")
        verdict.append(formatting.printable(result.error, lines=True))
    elif result.comparison is not None and result.comparison.same:
        verdict.append("same", style="bold #5fd75f")
        verdict.append(" as captured", style="dim")
    elif result.comparison is not None:
        verdict.append("DIFFERENT", style="bold #ff5f5f")
        for difference in result.comparison.differences:
            verdict.append(f"\n  {formatting.printable(str(difference))}")
    verdict.append(f"   ({result.duration_ns / 1e6:.1f} ms)", style="dim")
    old = _side(
        "captured",
        captured.status,
        captured.response_headers,
        captured.response_body,
        captured.response_truncated,
    )
    new = _side("replayed", result.status, result.headers, result.body)
    return Group(head, verdict), old, new


class ComparisonScreen(ModalScreen[None]):
    """Each resent request: the verdict, then the captured and new response side by side."""

    DEFAULT_CSS = """
    ComparisonScreen { align: center middle; }
    ComparisonScreen > #compare-box {
        width: 98%; height: 95%; border: round $accent; background: $surface; padding: 0 1;
    }
    ComparisonScreen .compare-verdict { margin: 1 0 0 0; }
    ComparisonScreen .compare-sides { height: auto; }
    ComparisonScreen .compare-side { width: 1fr; height: auto; padding: 0 1 0 0; }
    ComparisonScreen #compare-hint { color: $text-muted; }
    """

    BINDINGS = [Binding("escape,q", "dismiss", "Close", show=False, id="compare-close")]

    def __init__(self, results: Sequence[Resent]) -> None:
        super().__init__()
        self.results = list(results)

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="compare-box"):
            close = keys_of(self.app, "compare-close", "escape,q")
            yield Static(f"{close} to close", id="compare-hint")
            for result in self.results:
                verdict, old, new = render_comparison(result)
                yield Static(verdict, classes="compare-verdict")
                with Horizontal(classes="compare-sides"):
                    yield Static(old, classes="compare-side")
                    yield Static(new, classes="compare-side")

    def action_copy_text(self) -> None:
        """Ctrl+C: the text selected with the mouse, else everything the screen says."""
        copy_text(self, self.get_selected_text() or "", self.text(), "the comparison")

    def text(self) -> str:
        """Everything the screen says, as plain text (for tests and copying)."""
        parts = []
        for result in self.results:
            for renderable in render_comparison(result):
                parts.append(_plain(renderable))
        return "\n".join(parts)


def _plain(renderable: RenderableType) -> str:
    if isinstance(renderable, Text):
        return renderable.plain
    if isinstance(renderable, Group):
        return "\n".join(_plain(r) for r in renderable.renderables)
    return str(renderable)
