"""All configuration in one validated object.

Every setting has a command-line flag and an ``OUTBOX_*`` environment variable; secrets also take
``OUTBOX_*_FILE`` (a path, as mounted from a Kubernetes Secret). Precedence: flag, then
variable, then ``*_FILE``, then the default. A bad value raises `ConfigError` with one line
naming the setting.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from outbox.exceptions import ConfigError

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_LOG_LEVELS = ("debug", "info", "warning", "error")


def _meta(
    help: str, *, env: str, secret: bool = False, choices: tuple[str, ...] | None = None,
    minimum: float | None = None, maximum: float | None = None,
) -> dict[str, Any]:
    return {
        "help": help, "env": env, "secret": secret, "choices": choices,
        "minimum": minimum, "maximum": maximum,
    }


@dataclass(frozen=True)
class Settings:
    """The relay's settings; build with `Settings.load`, which validates."""

    database_url: str = field(
        default="postgresql://postgres@localhost:5432/postgres",
        metadata=_meta("PostgreSQL URL (libpq form; sslmode, sslrootcert… as query parameters)",
                       env="OUTBOX_DATABASE_URL", secret=True),
    )
    amqp_url: str = field(
        default="amqp://guest:guest@localhost:5672/",
        metadata=_meta("RabbitMQ URL; several comma-separated URLs for the nodes of a cluster "
                       "(amqps:// for TLS)", env="OUTBOX_AMQP_URL", secret=True),
    )
    schema: str = field(
        default="public",
        metadata=_meta("PostgreSQL schema holding the outbox and inbox tables",
                       env="OUTBOX_SCHEMA"),
    )
    batch_size: int = field(
        default=1000,
        metadata=_meta("rows claimed and published per batch", env="OUTBOX_BATCH_SIZE",
                       minimum=1, maximum=10_000),
    )
    concurrency: int = field(
        default=3,
        metadata=_meta("batches in flight at once (each on its own database connection)",
                       env="OUTBOX_CONCURRENCY", minimum=1, maximum=16),
    )
    on_sent: str = field(
        default="delete",
        metadata=_meta("what happens to a confirmed row: delete it, or mark it sent "
                       "(then `outbox cleanup` removes old ones)", env="OUTBOX_ON_SENT",
                       choices=("delete", "mark")),
    )
    poll_interval: float = field(
        default=1.0,
        metadata=_meta("seconds between polls when no NOTIFY arrives", env="OUTBOX_POLL_INTERVAL",
                       minimum=0.01, maximum=60),
    )
    max_attempts: int = field(
        default=10,
        metadata=_meta("failed publishes before a row is parked as dead",
                       env="OUTBOX_MAX_ATTEMPTS", minimum=1, maximum=1000),
    )
    retry_base: float = field(
        default=1.0,
        metadata=_meta("first retry delay in seconds (doubles per attempt, with jitter)",
                       env="OUTBOX_RETRY_BASE", minimum=0.0, maximum=3600),
    )
    retry_max: float = field(
        default=300.0,
        metadata=_meta("cap of the retry delay in seconds", env="OUTBOX_RETRY_MAX",
                       minimum=0.0, maximum=86_400),
    )
    publish_timeout: float = field(
        default=5.0,
        metadata=_meta("deadline in seconds for publishing a batch and receiving its confirms",
                       env="OUTBOX_PUBLISH_TIMEOUT", minimum=0.1, maximum=120),
    )
    db_timeout: float = field(
        default=5.0,
        metadata=_meta("deadline in seconds for connecting and for each query",
                       env="OUTBOX_DB_TIMEOUT", minimum=0.1, maximum=120),
    )
    max_body_bytes: int = field(
        default=1_048_576,
        metadata=_meta("largest message body published; larger rows are parked as dead",
                       env="OUTBOX_MAX_BODY_BYTES", minimum=1, maximum=134_217_728),
    )
    app_id: str = field(
        default="outbox",
        metadata=_meta("AMQP app_id property of published messages", env="OUTBOX_APP_ID"),
    )
    heartbeat: int = field(
        default=10,
        metadata=_meta("AMQP heartbeat in seconds (the relay's own deadlines find a dead peer "
                       "sooner)", env="OUTBOX_HEARTBEAT", minimum=0, maximum=600),
    )
    http_port: int = field(
        default=9487,
        metadata=_meta("port of /metrics, /healthz and /readyz (0 turns it off)",
                       env="OUTBOX_HTTP_PORT", minimum=0, maximum=65535),
    )
    stats_interval: float = field(
        default=10.0,
        metadata=_meta("seconds between refreshes of the backlog gauges (pending, dead, lag)",
                       env="OUTBOX_STATS_INTERVAL", minimum=0.5, maximum=3600),
    )
    shutdown_timeout: float = field(
        default=20.0,
        metadata=_meta("seconds to settle the batches in flight after SIGTERM",
                       env="OUTBOX_SHUTDOWN_TIMEOUT", minimum=0.0, maximum=3600),
    )
    log_level: str = field(
        default="info",
        metadata=_meta("log level", env="OUTBOX_LOG_LEVEL", choices=_LOG_LEVELS),
    )

    @classmethod
    def load(
        cls, overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Build settings from flags (``overrides``), the environment and the defaults."""
        env = os.environ if environ is None else environ
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw, source = _lookup(f, given, env)
            if raw is None:
                continue
            values[f.name] = _convert(f, raw, source)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Check the relations between settings; raise `ConfigError` on the first problem."""
        if not _IDENTIFIER.match(self.schema):
            raise ConfigError(
                f"OUTBOX_SCHEMA={self.schema!r} is not a plain identifier "
                "(letters, digits and _, at most 63 characters)")
        if len(self.app_id.encode()) > 255:
            raise ConfigError(
                f"OUTBOX_APP_ID: {len(self.app_id.encode())} bytes, over AMQP's short-string "
                "limit of 255")
        if self.retry_max < self.retry_base:
            raise ConfigError(
                f"OUTBOX_RETRY_MAX ({self.retry_max}) is smaller than OUTBOX_RETRY_BASE "
                f"({self.retry_base})")
        for url in self.amqp_urls:
            if urlsplit(url).scheme not in ("amqp", "amqps"):
                raise ConfigError(
                    f"OUTBOX_AMQP_URL: {redact(url)!r} is not an amqp:// or amqps:// URL")
        if urlsplit(self.database_url).scheme not in ("postgresql", "postgres"):
            raise ConfigError(
                f"OUTBOX_DATABASE_URL: {redact(self.database_url)!r} is not a "
                "postgresql:// URL")

    @property
    def amqp_urls(self) -> list[str]:
        return [u.strip() for u in self.amqp_url.split(",") if u.strip()]

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with passwords removed from URLs (for logs and `doctor`)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = ",".join(redact(u) for u in value.split(",")) if f.metadata[
                "secret"] else value
        return out


def redact(url: str) -> str:
    """Replace the password of a URL with ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _lookup(
    f: dataclasses.Field[Any], given: Mapping[str, Any], env: Mapping[str, str],
) -> tuple[Any, str]:
    var: str = f.metadata["env"]
    if f.name in given:
        return given[f.name], flag_name(f.name)
    if var in env and env[var] != "":
        return env[var], var
    if f.metadata["secret"] and env.get(var + "_FILE"):
        path = Path(env[var + "_FILE"])
        try:
            return path.read_text().strip(), f"{var}_FILE"
        except OSError as exc:
            raise ConfigError(f"{var}_FILE={path}: cannot read it ({exc.strerror})") from None
    return None, ""


def _convert(f: dataclasses.Field[Any], raw: Any, source: str) -> Any:
    meta = f.metadata
    convert: Callable[[Any], Any] = {"int": int, "float": float, "str": str}[str(f.type)]
    shown = "***" if meta["secret"] else repr(raw)
    try:
        value = convert(raw)
    except (TypeError, ValueError):
        kind = {"int": "an integer", "float": "a number"}.get(str(f.type), "a string")
        raise ConfigError(f"{source}={shown}: expected {kind}") from None
    if meta["choices"] is not None:
        value = value.lower()
        if value not in meta["choices"]:
            raise ConfigError(f"{source}={shown}: expected one of {', '.join(meta['choices'])}")
    low, high = meta["minimum"], meta["maximum"]
    if low is not None and (value < low or value > high or value != value):
        raise ConfigError(f"{source}={shown}: expected a value between {low:g} and {high:g}")
    return value
