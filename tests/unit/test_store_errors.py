"""How the store reads libpq's connection errors: a TLS refusal is permanent and leads with its
cause; an outage is not. The lines are libpq 18's, as psycopg raises them (tests/integration/
test_tls.py gets them from a real server)."""

from __future__ import annotations

import psycopg
import pytest

from outbox.exceptions import PermanentRefusal, StoreUnavailable
from outbox.store import describe_tls, translation

AT = 'connection failed: connection to server at "127.0.0.1", port 5433 failed: '


@pytest.mark.parametrize(("libpq", "words"), [
    ("SSL error: certificate verify failed",
     "TLS: certificate verify failed: the server certificate is not signed by the CA of "
     "sslrootcert, expired, or not yet valid"),
    ('server certificate for "db.internal" does not match host name "10.0.0.5"',
     'TLS: hostname mismatch: server certificate for "db.internal" does not match host name '
     '"10.0.0.5"'),
    ('root certificate file "/etc/ca.pem" does not exist',
     'TLS: root certificate file "/etc/ca.pem" does not exist'),
    ('private key file "/k.pem" has group or world access',
     'TLS: private key file "/k.pem" has group or world access'),
    ("SSL error: tlsv1 alert unknown ca", "TLS: tlsv1 alert unknown ca"),
])
def test_a_tls_refusal_is_permanent_and_says_why(libpq: str, words: str) -> None:
    exc = translation(psycopg.OperationalError(AT + libpq), "connecting to db")
    assert isinstance(exc, PermanentRefusal)
    assert str(exc) == f'connecting to db: {words} (connection to server at "127.0.0.1", ' \
        'port 5433)'


def test_the_reason_found_by_the_probe_replaces_the_guess() -> None:
    line = describe_tls(AT + "SSL error: certificate verify failed", "certificate has expired")
    assert line.startswith("TLS: certificate verify failed: certificate has expired (")


def test_an_outage_is_not_a_refusal() -> None:
    exc = translation(psycopg.OperationalError(AT + "Connection refused"), "connecting to db")
    assert isinstance(exc, StoreUnavailable)
