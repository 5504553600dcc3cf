"""Command palette entries: every action of the UI, prefixed by what it is about.

One table, :data:`PALETTE`, names each entry and the action it runs, so the palette,
the key bindings and the help screen all go through the same ``action_*`` methods.
"""

from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

__all__ = ["PALETTE", "HopscopeCommands"]

#: ``(title, action, help)``; actions run on the app.
PALETTE: list[tuple[str, str, str]] = [
    ("view: follow newest requests", "follow", "Scroll to the newest request and stay there"),
    ("view: pause or resume", "toggle_pause", "Freeze the display; events wait meanwhile"),
    ("view: filter requests", "focus_filter", "Edit the filter expression"),
    ("view: clear the filter", "clear_filter", "Show every request again"),
    ("view: search", "focus_search", "Find requests by text"),
    ("view: older search match", "search_next(-1)", "Select the next match above"),
    ("view: newer search match", "search_next(1)", "Select the next match below"),
    ("view: clear all requests", "clear", "Forget every request held so far"),
    ("view: timeline tab", "show_tab('timeline')", "Hops and spans of the selected request"),
    ("view: request tab", "show_tab('request')", "Headers, query and body sent"),
    ("view: response tab", "show_tab('response')", "Status, headers and body returned"),
    ("view: logs tab", "show_tab('logs')", "Log records emitted while the request ran"),
    ("view: error tab", "show_tab('error')", "Tracebacks of the selected request"),
    ("view: raw tab", "show_tab('raw')", "The selected request's events as JSON"),
    ("view: keys and help", "help", "Every key and mouse action"),
    ("export: save trace file", "save", "Write every request held as a trace file (0600)"),
    (
        "export: save filtered requests",
        "save(True)",
        "Write only the requests the filter shows",
    ),
    ("export: copy request as curl", "copy_curl", "Put a curl command for it on the clipboard"),
    (
        "export: copy request as HTTPie",
        "copy_as('httpie')",
        "Put an HTTPie command for it on the clipboard",
    ),
    (
        "export: copy request as httpx",
        "copy_as('httpx')",
        "Put a Python httpx script for it on the clipboard",
    ),
]


class HopscopeCommands(Provider):
    """Offers :data:`PALETTE` to Textual's command palette (ctrl+p)."""

    async def discover(self) -> Hits:
        for title, action, help_text in PALETTE:
            yield DiscoveryHit(title, partial(self.app.run_action, action), help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, action, help_text in PALETTE:
            score = matcher.match(title)
            if score > 0:
                yield Hit(
                    score,
                    matcher.highlight(title),
                    partial(self.app.run_action, action),
                    text=title,
                    help=help_text,
                )
