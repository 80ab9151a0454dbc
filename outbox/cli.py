"""The ``outbox`` command: one function per subcommand.

Every setting is a flag whose default comes from its ``OUTBOX_*`` variable (shown by ``--help``).
One top-level handler turns errors into one line: exit 2 for bad configuration, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields
from typing import TYPE_CHECKING, Any

import orjson

from outbox import logs
from outbox.exceptions import ConfigError, OutboxError, first_line
from outbox.settings import Settings, flag_name, redact

if TYPE_CHECKING:
    from outbox.ports import Writer

# Settings every subcommand takes; the rest are the relay's own.
COMMON = ("database_url", "schema", "db_timeout", "log_level")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``7d``, ``2w`` → seconds."""
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (examples: 90s, 15m, 7d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def human_duration(seconds: float) -> str:
    """The inverse of `duration`, for messages: 1209600 → ``14d``, 90 → ``90s``."""
    for unit in ("w", "d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{seconds / _UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


def _add_settings(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    group = parser.add_argument_group("settings (flag, else environment variable, else default)")
    defaults = Settings()
    for f in fields(Settings):
        if f.name not in names:
            continue
        meta = f.metadata
        default = getattr(defaults, f.name)
        shown = redact(str(default)) if meta["secret"] else default
        env = meta["env"] + (f" or {meta['env']}_FILE" if meta["secret"] else "")
        choices = f" ({'|'.join(meta['choices'])})" if meta["choices"] else ""
        group.add_argument(
            flag_name(f.name), dest=f.name, default=None, metavar=f.name.split("_")[-1].upper(),
            help=f"{meta['help']}{choices} [env {env}; default {shown}]")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {f.name: getattr(args, f.name, None) for f in fields(Settings)}
    return Settings.load(overrides)


def _run(coro: Any) -> Any:
    from outbox.runner import install_uvloop

    install_uvloop()
    return asyncio.run(coro)


# -- subcommands -----------------------------------------------------------------------------------

def cmd_relay(args: argparse.Namespace) -> int:
    from outbox.runner import run_relay

    settings = _settings(args)
    counts = _run(run_relay(settings, drain=args.drain))
    if args.drain:
        stats = _run(_stats(settings))
        print(f"drained: published={counts.published} retried={counts.failed} "
              f"dead={counts.dead} left_pending={stats.pending} "
              "(waiting for a retry, behind a dead row of their key, or keyed rows held back "
              "by an older open transaction: see `outbox status`)")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from outbox import migrate

    settings = _settings(args)
    try:
        before, after = migrate.upgrade(settings, args.revision)
    except Exception as exc:  # alembic/sqlalchemy raise many types; report one line
        raise OutboxError(f"migration failed: {logs.scrub(first_line(exc))}") from exc
    if before == after:
        print(f"schema {settings.schema!r} is up to date (revision {after})")
    else:
        print(f"schema {settings.schema!r} migrated from {before or 'nothing'} to {after}")
    return 0


async def _stats(settings: Settings) -> Any:
    from outbox.store import PgStore

    return await PgStore(settings).stats()


def cmd_status(args: argparse.Namespace) -> int:
    stats = _run(_stats(_settings(args)))
    if args.json:
        print(orjson.dumps(asdict(stats)).decode())
        return 0
    print(f"pending      {stats.pending} ({stats.ready} ready, {stats.retrying} waiting to retry)")
    print(f"dead         {stats.dead} (blocking {stats.blocked_keys} ordering keys)")
    print(f"oldest       {stats.oldest_pending_age_seconds:.1f}s pending")
    if stats.sent:
        print(f"sent, kept   {stats.sent} (`outbox cleanup` removes old ones)")
    writer = stats.oldest_writer
    if writer is not None:
        print(f"horizon      {describe_writer(writer)}")
    if stats.held_back_rows:
        print(f"held back    {stats.held_back_rows} keyed rows wait for that transaction to end "
              "(docs/ordering.md, \"The price of the horizon\")")
    return 0


def describe_writer(w: Writer) -> str:
    """One line about the transaction that holds the ordering horizon back."""
    where = ", ".join(f"{k} {v}" for k, v in (("database", w.database), ("role", w.role),
                                               ("application", w.application_name),
                                               ("state", w.state)) if v)
    age = ("age hidden from this role: grant it pg_read_all_stats" if w.age_seconds is None
           else f"open {w.age_seconds:.1f}s")
    what = f"prepared transaction {w.prepared!r}" if w.prepared is not None else f"pid {w.pid}"
    return (f"oldest writing transaction: {what} ({where}), {age}, "
            f"{w.xids_since} transaction ids since")


def _selector(args: argparse.Namespace, *, require: bool) -> dict[str, Any]:
    ids = args.id or None
    key = args.routing_key
    if require and ids is None and key is None and not args.all:
        raise ConfigError("say which dead rows: --id N (repeatable), --routing-key KEY, or --all")
    return {"ids": ids, "routing_key": key}


def cmd_dead(args: argparse.Namespace) -> int:
    from outbox.store import PgStore

    store = PgStore(_settings(args))
    if args.action == "list":
        rows = _run(store.fetch("dead_list", {**_selector(args, require=False),
                                              "limit": args.limit}))
        if args.json:
            print(orjson.dumps(rows, default=str).decode())
            return 0
        if not rows:
            print("no dead rows")
        for r in rows:
            print(f"{r['id']}\t{r['message_id']}\t{r['exchange'] or '(default)'}\t"
                  f"{r['routing_key']}\tkey={r['ordering_key'] or '-'}\tattempts={r['attempts']}\t"
                  f"age={r['age_seconds']:.0f}s\t{r['last_error']}")
        return 0
    query = "dead_retry" if args.action == "retry" else "dead_discard"
    changed = _run(store.execute(query, _selector(args, require=True)))
    verb = "back to pending" if args.action == "retry" else "discarded"
    print(f"{changed} dead rows {verb}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from outbox import doctor

    overrides = {f.name: getattr(args, f.name, None) for f in fields(Settings)}
    return doctor.report(_run(doctor.diagnose(overrides, args.exchange or (),
                                              max_transaction_age=args.max_transaction_age)))


def cmd_cleanup(args: argparse.Namespace) -> int:
    return _prune(args, "cleanup", "sent rows")


def cmd_inbox(args: argparse.Namespace) -> int:
    return _prune(args, "inbox_prune", "inbox entries")


def _prune(args: argparse.Namespace, query: str, what: str) -> int:
    from outbox.store import PgStore

    store = PgStore(_settings(args))
    total = 0
    while True:
        n = _run(store.execute(query, {"older_than": args.older_than, "limit": args.chunk}))
        total += n
        if n:
            print(f"deleted {total} {what} so far", file=sys.stderr)
        if n < args.chunk:
            break
    print(f"deleted {total} {what} older than {human_duration(args.older_than)}")
    return 0


# -- parser ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outbox",
        description="Transactional-outbox relay: PostgreSQL -> RabbitMQ.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str,
            settings: Sequence[str] = COMMON, parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        _add_settings(p, settings)
        p.set_defaults(func=func)
        return p

    relay = add("relay", cmd_relay, "publish pending rows to RabbitMQ until stopped",
                [f.name for f in fields(Settings)])
    relay.add_argument("--drain", action="store_true",
                       help="publish everything ready, then exit 0")
    mig = add("migrate", cmd_migrate, "create or upgrade the outbox and inbox tables")
    mig.add_argument("--revision", default="head", help="target revision (default: head)")
    status = add("status", cmd_status,
                 "show pending, dead, blocked keys, the lag and the ordering horizon")
    status.add_argument("--json", action="store_true", help="print one JSON object")

    dead = sub.add_parser("dead", help="list, retry or discard dead rows",
                          description="list, retry or discard dead rows")
    dead_sub = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("list", "show dead rows with their reason"),
                         ("retry", "put dead rows back to pending"),
                         ("discard", "delete dead rows for good")):
        p = add(action, cmd_dead, text, parent=dead_sub)
        p.add_argument("--id", type=int, action="append", help="a row id (repeatable)")
        p.add_argument("--routing-key", help="rows with this routing key")
        if action == "list":
            p.add_argument("--limit", type=int, default=100, help="at most this many rows")
            p.add_argument("--json", action="store_true", help="print a JSON array")
        else:
            p.add_argument("--all", action="store_true", help="every dead row")

    doc = add("doctor", cmd_doctor, "check settings, database, schema, NOTIFY and broker; exit 1 "
              "on a FAIL", [f.name for f in fields(Settings)])
    doc.add_argument("--exchange", action="append", help="probe a publish to this exchange "
                     "instead of the default one (repeatable)")
    doc.add_argument("--max-transaction-age", type=duration, default=duration("60s"),
                     help="warn about a writing or prepared transaction open longer than this: "
                     "it holds keyed rows back (default 60s)")
    clean = add("cleanup", cmd_cleanup,
                "delete rows marked sent (--on-sent mark) older than a retention")
    clean.add_argument("--older-than", type=duration, default=duration("7d"),
                       help="retention, e.g. 12h or 7d (default 7d)")
    clean.add_argument("--chunk", type=int, default=10_000, help="rows deleted per statement")

    inbox = sub.add_parser("inbox", help="maintain the consumers' inbox table",
                           description="maintain the consumers' inbox table")
    inbox_sub = inbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    prune = add("prune", cmd_inbox, "forget processed message ids older than a retention",
                parent=inbox_sub)
    prune.add_argument("--older-than", type=duration, default=duration("14d"),
                       help="retention; must outlast the longest redelivery (default 14d)")
    prune.add_argument("--chunk", type=int, default=10_000, help="rows deleted per statement")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        logs.setup(getattr(args, "log_level", None) or _env_log_level())
        code: int = args.func(args)
        return code
    except ConfigError as exc:
        print(f"outbox: configuration error: {exc}", file=sys.stderr)
        return 2
    except OutboxError as exc:
        print(f"outbox: {logs.scrub(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _env_log_level() -> str:
    import os

    level = os.environ.get("OUTBOX_LOG_LEVEL", "info").lower()
    return level if level in ("debug", "info", "warning", "error") else "info"


if __name__ == "__main__":
    sys.exit(main())
