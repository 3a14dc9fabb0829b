"""``deepminer jobs list|show|cancel``: the long jobs in the host's job file (``DEEPMINER_JOBS``;
``make run``: ``var/jobs.sqlite``; :mod:`deepminer.jobs`). ``cancel`` stops a job at its next step
(the request answers ``409 Cancelled``); an unknown or finished job is a one-line error (exit 2),
nothing is changed."""
from __future__ import annotations

import argparse
import datetime as dt
import os

from deepminer.errors import DeepMinerError

NAME = "jobs"
HELP = "list, show or cancel the long jobs (POST /explanations) of the TorchServe on this host"
DESCRIPTION = (
    "The long jobs of this host's TorchServe workers (peer saliency requests, set evaluations) as their job "
    "file holds them: state, method, steps done of all, seconds. 'cancel ID' stops one at its next step "
    "(its request answers 409 Cancelled and the worker takes the next request)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--file", default=os.environ.get("DEEPMINER_JOBS") or "var/jobs.sqlite",
                        help="the job file (env DEEPMINER_JOBS)")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = sub.add_parser("list", help="the jobs, newest first, one a line")
    ls.add_argument("--all", action="store_true", help="finished jobs too (default: queued and running only)")
    sub.add_parser("show", help="one job's row").add_argument("id")
    sub.add_parser("cancel", help="stop a queued or running job at its next step").add_argument("id")


def _line(row: dict) -> str:
    started = dt.datetime.fromtimestamp(row["created"]).strftime("%Y-%m-%d %H:%M:%S")
    return (f"{row['id']}  {row['state']:<9}  {row['step'] or '-':<20}  {row['done']}/{row['total']} steps  "
            f"{row['elapsed_s']:.1f} s  {started}" + (f"  by {row['owner']}" if row.get("owner") else "")
            + (f"  ({row['message']})" if row.get("message") else ""))


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deepminer.jobs import JobStore

    path = Path(args.file)
    if not path.is_file():
        raise DeepMinerError(f"{path}: no job file (is the server running here? set DEEPMINER_JOBS or --file)")
    store = JobStore(path)
    if args.action == "list":
        for each in store.rows(finished=args.all):
            print(_line(each))
        return 0
    row = store.get(args.id)
    if row is None:
        raise DeepMinerError(f"no job {args.id!r} in {path}")
    if args.action == "show":
        print(_line(row))
        return 0
    if not store.cancel(args.id):
        if row["cancel"] and row["state"] in ("queued", "running"):
            raise DeepMinerError(f"job {args.id}: cancel asked already; it stops at its next step")
        raise DeepMinerError(f"job {args.id} is {row['state']}: nothing to cancel")
    print(f"job {args.id}: cancel asked; it stops at its next step")
    return 0
