"""``deepminer``: one CLI, one subcommand per module.

The commands are the modules of :data:`COMMANDS` (plain imports, below) plus those other installed
packages declare under the entry-point group ``deepminer.commands`` (the standard plugin mechanism:
this project's ``serve`` package declares ``archive = "serve.archive"`` in ``pyproject.toml``; the
library itself never imports ``serve``). A command module defines ``NAME``, ``HELP``, optionally
``DESCRIPTION``, ``add_arguments(parser)`` and ``run(args) -> int``.

Start-up stays fast (``deepminer --help`` imports no torch, numpy or pandas): command modules import
what they need inside ``add_arguments``/``run``, only the chosen command's ``add_arguments`` runs,
and entry points are looked up only when the command line does not name a built-in command (the
top-level help lists them).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from types import ModuleType

from deepminer import __version__
from deepminer.commands import (
    atlas_ablation,
    bench,
    calibrate,
    dissect,
    domain_fit,
    evaluate,
    evaluate_explanations,
    explain,
    import_cbis,
    inspect,
    jobs,
    patches,
    phantoms,
    train,
    train_whole,
    users,
)
from deepminer.errors import DeepMinerError

COMMANDS: tuple[ModuleType, ...] = (atlas_ablation, bench, calibrate, dissect, domain_fit, evaluate, evaluate_explanations, explain, import_cbis, inspect,
                                    jobs, patches, phantoms, train, train_whole, users)
ENTRY_POINT_GROUP = "deepminer.commands"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Option defaults in the help; an ``EPILOG`` (a command's list, one item per line) kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:  # a list written line by line (EPILOG): keep its lines
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


def plugin_commands() -> list[ModuleType]:
    """The command modules installed packages declare under :data:`ENTRY_POINT_GROUP` (loaded)."""
    from importlib.metadata import entry_points  # the plugin mechanism, not the project's own code

    return [ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP)]


def _chosen(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names: its first word that is not an option (the top-level options,
    ``-h``/``--help``/``--version``, take no value)."""
    for word in argv:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word
    return None


def commands(argv: Sequence[str] | None = None) -> list[ModuleType]:
    """The command modules, by name: the built-in ones, plus the entry-point ones unless ``argv``
    names a built-in command (then they are not needed and not loaded)."""
    chosen = _chosen(argv) if argv is not None else None
    mods = list(COMMANDS)
    if chosen is None or chosen not in {m.NAME for m in COMMANDS}:
        mods += [m for m in plugin_commands() if m.NAME not in {b.NAME for b in COMMANDS}]
    return sorted(mods, key=lambda m: m.NAME)


def build_parser(argv: Sequence[str] | None = None, *, full: Iterable[str] = ()) -> argparse.ArgumentParser:
    """The parser for ``argv``: every command is listed, but only the one ``argv`` names (and those
    in ``full``) gets its arguments, so that building it imports nothing heavy. ``argv=None``: the
    top-level parser (every command, entry points included, without arguments unless in ``full``)."""
    parser = argparse.ArgumentParser(
        prog="deepminer",
        description="DeepMiner Studio: phantom data, training, unit profiling and explanations "
        "for mammogram classifiers. Run 'deepminer COMMAND --help' for each command.",
    )
    parser.add_argument("--version", action="version", version=f"deepminer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = set(full)
    if argv is not None and _chosen(argv):
        wanted.add(str(_chosen(argv)))
    for mod in commands(argv):
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           epilog=getattr(mod, "EPILOG", None), formatter_class=_Formatter)
        if mod.NAME in wanted:
            mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from deepminer.runtime import keep_freed_memory

    keep_freed_memory()  # CPU forward passes 2-3x faster (deepminer/runtime.py)
    try:
        return int(args._run(args) or 0)
    except DeepMinerError as err:
        print(f"deepminer {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deepminer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
