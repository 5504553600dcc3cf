"""The header line: where events come from, how fast, how they ended, what was lost."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.cells import cell_len
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Sparkline, Static

from . import formatting
from .formatting import STATUS_STYLES

__all__ = ["HeaderBar", "stats_text"]


def stats_text(
    *, total: int, counts: Mapping[str, int], inflight: int, dropped: int, rejected: int = 0
) -> Text:
    text = Text(no_wrap=True, overflow="ellipsis", end="")
    text.append(f"{total:,}", style="bold")
    text.append(" req │", style="dim")
    for name in ("2xx", "3xx", "4xx", "5xx", "err"):
        count = counts.get(name, 0)
        if count or name in ("2xx", "4xx", "5xx"):
            text.append(" ")
            text.append(name, style=STATUS_STYLES[name])
            text.append(f" {count:,}")
    text.append(" │ ", style="dim")
    text.append(f"{inflight:,}")
    text.append(" in flight │ ", style="dim")
    text.append(f"{dropped:,}", style="bold #ff5f5f" if dropped else "")
    text.append(" dropped", style="dim")
    if rejected:
        text.append(" │ ", style="dim")
        text.append(f"{rejected:,}", style="#ffd75f")
        text.append(" bad events", style="dim")
    return text


class HeaderBar(Horizontal):
    """One line at the top; updated once per UI tick, never per event."""

    DEFAULT_CSS = """
    HeaderBar { height: 1; background: $panel; }
    HeaderBar > #header-source { width: auto; max-width: 40%; padding: 0 1; text-style: bold; }
    HeaderBar > #header-rate { width: 16; margin: 0 1; }
    HeaderBar > #header-rate-label { width: 7; color: $text-muted; }
    HeaderBar > #header-stats { width: 1fr; padding: 0 1; text-align: right; }
    """

    def __init__(self, source: str, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._source = source
        self._last: tuple[object, ...] | None = None

    def compose(self) -> ComposeResult:
        self._source_line = Static(self._source_text(False), id="header-source")
        self._sparkline = Sparkline([0.0], id="header-rate")
        self._rate_label = Static("0/s", id="header-rate-label")
        self._stats = Static("", id="header-stats")
        yield self._source_line
        yield self._sparkline
        yield self._rate_label
        yield self._stats

    def show_source(self, source: str) -> None:
        """Change what the left end says (a playback's position moves)."""
        if source != self._source:
            # Laid out again only when its width changes: a whole-screen layout per
            # tick while a big file loads ("loading 42%") was a tenth of opening it.
            resized = cell_len(source) != cell_len(self._source)
            self._source = source
            paused = bool(self._last[0]) if self._last is not None else False
            self._source_line.update(self._source_text(paused), layout=resized)

    def _source_text(self, paused: bool) -> Text:
        text = Text(formatting.printable(self._source), style="bold")
        if paused:
            text.append("  ⏸ paused", style="bold #ffd75f")
        return text

    def update_stats(
        self,
        *,
        paused: bool,
        total: int,
        counts: Mapping[str, int],
        inflight: int,
        dropped: int,
        rejected: int,
        rate: Sequence[float],
    ) -> None:
        state = (
            paused,
            total,
            tuple(sorted(counts.items())),
            inflight,
            dropped,
            rejected,
            tuple(rate),
        )
        if state == self._last:
            return
        if self._last is None or self._last[0] != paused:
            self._source_line.update(self._source_text(paused))
        self._last = state
        self._sparkline.data = list(rate)
        # The newest second is still filling up: the one before is the honest rate.
        current = rate[-2] if len(rate) > 1 else (rate[-1] if rate else 0)
        self._rate_label.update(f"{current:,.0f}/s", layout=False)
        self._stats.update(
            stats_text(
                total=total, counts=counts, inflight=inflight, dropped=dropped, rejected=rejected
            ),
            layout=False,
        )
