from __future__ import annotations

import subprocess
import sys

import pytest

from outbox.exceptions import ConfigError
from outbox.settings import Settings, redact


def test_defaults_point_at_localhost() -> None:
    s = Settings.load(environ={})
    assert "localhost" in s.database_url and "localhost" in s.amqp_url
    assert s.schema == "public" and s.on_sent == "delete"


def test_flag_beats_environment_beats_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    secret = tmp_path / "url"
    secret.write_text("amqp://u:p@file-host/\n")
    env = {"OUTBOX_AMQP_URL_FILE": str(secret), "OUTBOX_BATCH_SIZE": "42"}
    assert Settings.load(environ=env).amqp_url == "amqp://u:p@file-host/"
    assert Settings.load(environ={**env, "OUTBOX_AMQP_URL": "amqp://env/"}).amqp_url == \
        "amqp://env/"
    s = Settings.load({"amqp_url": "amqp://flag/", "batch_size": "7"}, environ=env)
    assert s.amqp_url == "amqp://flag/" and s.batch_size == 7


@pytest.mark.parametrize(("env", "message"), [
    ({"OUTBOX_BATCH_SIZE": "many"}, "OUTBOX_BATCH_SIZE='many': expected an integer"),
    ({"OUTBOX_BATCH_SIZE": "0"}, "expected a value between 1 and 10000"),
    ({"OUTBOX_POLL_INTERVAL": "nan"}, "OUTBOX_POLL_INTERVAL"),
    ({"OUTBOX_ON_SENT": "archive"}, "expected one of delete, mark"),
    ({"OUTBOX_SCHEMA": 'x"; drop table outbox; --'}, "is not a plain identifier"),
    ({"OUTBOX_AMQP_URL": "http://broker"}, "is not an amqp:// or amqps:// URL"),
    ({"OUTBOX_DATABASE_URL": "mysql://db"}, "is not a postgresql:// URL"),
    ({"OUTBOX_RETRY_BASE": "10", "OUTBOX_RETRY_MAX": "1"}, "smaller than OUTBOX_RETRY_BASE"),
    ({"OUTBOX_DATABASE_URL_FILE": "/nonexistent/secret"}, "cannot read it"),
    ({"OUTBOX_APP_ID": "a" * 256}, "OUTBOX_APP_ID: 256 bytes, over AMQP's short-string limit"),
])
def test_bad_settings_are_refused_with_the_setting_named(env: dict[str, str],
                                                         message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        Settings.load(environ=env)


def test_a_secret_is_never_echoed_in_an_error() -> None:
    with pytest.raises(ConfigError) as err:
        Settings.load(environ={"OUTBOX_AMQP_URL": "http://user:hunter2@broker"})
    assert "hunter2" not in str(err.value)


def test_redact_removes_passwords() -> None:
    assert redact("amqp://guest:guest@h:5672/v") == "amqp://guest:***@h:5672/v"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"
    assert "s3cret" not in str(Settings.load(
        {"database_url": "postgresql://u:s3cret@h/db"}, environ={}).redacted())


@pytest.mark.parametrize("env", [
    {"OUTBOX_BATCH_SIZE": "-3"},
    {"OUTBOX_LOG_LEVEL": "loud"},
    {"OUTBOX_AMQP_URL": "redis://x"},
])
def test_cli_exits_2_with_one_line(env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "outbox", "status"], env={"PATH": "", **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("outbox: configuration error: OUTBOX_")


@pytest.mark.parametrize(("text", "seconds", "shown"), [
    ("90", 90, "90s"), ("90s", 90, "90s"), ("15m", 900, "15m"), ("12h", 43200, "12h"),
    ("14d", 1209600, "2w"), ("3d", 259200, "3d"), ("1.5h", 5400, "90m"),
])
def test_durations_parse_and_print(text: str, seconds: float, shown: str) -> None:
    from outbox.cli import duration, human_duration

    assert duration(text) == seconds
    assert human_duration(seconds) == shown
