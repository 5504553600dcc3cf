"""``python -m hopscope.app``: the same as the ``hopscope`` command."""

from .cli import main

main(prog_name="hopscope")
