"""hopscope.app: the processes hopscope runs (CLI, collector, demo)."""
