"""hopscope.tui: the Textual terminal UI (arrives with issue 4)."""
