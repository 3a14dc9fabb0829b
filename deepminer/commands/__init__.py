"""One module per ``deepminer`` subcommand.

Each module defines ``NAME`` (the subcommand), ``HELP`` (one line), optionally ``DESCRIPTION``,
``add_arguments(parser)`` and ``run(args) -> int``, and is listed in :data:`deepminer.cli.COMMANDS`
(a test checks that every module here is). Keep module-level imports light and heavy ones (torch,
numpy, the data and model code) inside ``add_arguments``/``run``: ``deepminer --help`` imports every
command module and must not import torch. Commands of other packages (``archive`` from ``serve``)
come through the ``deepminer.commands`` entry-point group instead (see :mod:`deepminer.cli`).
"""
