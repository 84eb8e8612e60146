"""``python -m neurotrale_twisted ARGS``: the ``neurotrale`` command (the server, in the
foreground)."""

from neurotrale_twisted.command import main

main()
