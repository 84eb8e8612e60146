"""``python -m neurotrale_twisted ARGS``: the ``neurotrale`` command (the server, in the
foreground)."""

from neurotrale_twisted.process.command import main

main()
