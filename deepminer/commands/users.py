"""``deepminer users add|remove|list``: the lab proxy's password file (``name:bcrypt-hash`` lines, the
htpasswd format; the lab proxy's sign-in service, ``serve/auth.py``, checks it).

The password is read from a prompt (twice, not echoed) or, with ``--password-stdin``, from the first
line of standard input; never from the command line (it would land in shell history and ``ps``).
Every change rewrites the file atomically (a temporary file in the same folder, then a rename) with
mode 0600; nginx re-reads it on every request, so a change holds at once, without a restart.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from deepminer.errors import DeepMinerError

NAME = "users"
HELP = "add, remove or list the people who may sign in to the lab profile (bcrypt password file)"
DESCRIPTION = (
    "Manage the password file of the lab proxy (DEEPMINER_PROFILE=lab make run): one 'name:bcrypt-hash' line "
    "per person. The signed-in name is the annotator stored with every label. Passwords come from a prompt "
    "or from standard input (--password-stdin), never from the command line. A new password, or removing a "
    "person, ends their open sessions at once."
)
DEFAULT_FILE = "var/proxy/users"
USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")
MIN_PASSWORD = 8
BCRYPT_ROUNDS = 12


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--file", default=os.environ.get("DEEPMINER_USERS_FILE") or DEFAULT_FILE,
                        help="the password file (env DEEPMINER_USERS_FILE; relative to the current folder)")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = sub.add_parser("add", help="add a person, or set a new password for one")
    add.add_argument("name", help="the sign-in name (letters, digits, . _ @ -; at most 100)")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input instead of a prompt")
    rm = sub.add_parser("remove", help="remove a person (their labels stay, under their name)")
    rm.add_argument("name")
    sub.add_parser("list", help="the names in the file, one a line")


def check_name(name: str) -> str:
    if not USER_RE.match(name or ""):
        raise DeepMinerError(f"bad name {name!r}: use 1-100 letters, digits, '.', '_', '@' or '-' "
                             "(starting with a letter or digit)")
    return name


def read_users(path: Path) -> dict[str, str]:
    """``{name: hash}`` of the file (empty when it does not exist)."""
    if not path.is_file():
        return {}
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, hashed = line.partition(":")
        if not sep or not hashed:
            raise DeepMinerError(f"{path}:{n} is not a 'name:hash' line")
        out[name] = hashed
    return out


def write_users(path: Path, users: dict[str, str]) -> None:
    """Replace the file atomically (temporary file + rename): mode 0600, or the group and mode the
    existing file has (at most 0640: never world-readable)."""
    from deepminer.atomic import atomic_file

    with atomic_file(path, "w", perms=0o600) as f:
        if path.is_file():  # keep the group and mode the proxy gave it (serve/proxy.py: 0640, nginx's group)
            st = path.stat()
            os.fchown(f.fileno(), -1, st.st_gid)
            os.fchmod(f.fileno(), st.st_mode & 0o640)
        f.write("".join(f"{n}:{h}\n" for n, h in sorted(users.items())))
        f.flush()
        os.fsync(f.fileno())


def hash_password(password: str, rounds: int = BCRYPT_ROUNDS) -> str:
    """A bcrypt hash (``$2b$``; nginx checks it through the system's crypt, libxcrypt on Debian)."""
    import bcrypt

    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds=rounds)).decode("ascii")


def check_password(password: str, hashed: str) -> bool:
    import bcrypt

    return bcrypt.checkpw(password.encode("utf-8"), hashed.encode("ascii"))


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        import getpass

        if not sys.stdin.isatty():
            raise DeepMinerError("no terminal to ask for the password: pipe it with --password-stdin")
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise DeepMinerError("the two passwords differ")
    if len(password) < MIN_PASSWORD:
        raise DeepMinerError(f"the password must have at least {MIN_PASSWORD} characters")
    if len(password.encode("utf-8")) > 72:
        raise DeepMinerError("the password must be at most 72 bytes (bcrypt's limit)")
    return password


def run(args: argparse.Namespace) -> int:
    path = Path(args.file)
    users = read_users(path)
    if args.action == "list":
        for name in sorted(users):
            print(name)
        return 0
    name = check_name(args.name)
    if args.action == "remove":
        if name not in users:
            raise DeepMinerError(f"no user {name!r} in {path}")
        del users[name]
        write_users(path, users)
        print(f"removed {name} ({len(users)} left in {path})")
        return 0
    existed = name in users
    users[name] = hash_password(_read_password(args.password_stdin))
    write_users(path, users)
    print(f"{'new password for' if existed else 'added'} {name} ({path})")
    return 0
