"""One module per ``deepminer`` subcommand.

Each module defines ``NAME`` (the subcommand), ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. :mod:`deepminer.cli` discovers them; keep heavy imports inside ``run`` so that
``deepminer --help`` stays fast.
"""
