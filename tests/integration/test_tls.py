"""TLS, end to end: the relay, the consumer and `outbox doctor` over amqps:// and
sslmode=verify-full, and the one-line refusal each gives for a certificate that must not be trusted.

Certificates come from a throwaway CA (trustme, tests/certs.py). One private RabbitMQ node with a
TLS listener (it checks a client certificate when one is offered) and one private PostgreSQL with
ssl=on serve the whole module; a second node serves an expired certificate. The server
certificates name ``localhost`` only, so a URL with ``127.0.0.1`` is a host-name mismatch.
"""

from __future__ import annotations

import datetime
import logging
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiormq
import orjson
import psycopg
import pytest
import trustme
from psycopg import sql

from outbox import migrate
from outbox.consumer import Consumer, Message
from outbox.settings import Settings
from tests import support
from tests.certs import ClientCert, ServerCert
from tests.faults.harness import RelayProcess, rabbitmqctl
from tests.postgres_pair import PgServer, PostgresPair
from tests.rabbit_node import RabbitNode

pytestmark = pytest.mark.timeout(180)

ROWS = 200


@dataclass(frozen=True)
class Pki:
    good: ServerCert       # the servers' certificate, for localhost, from the trusted CA
    expired: ServerCert    # same CA, not valid any more
    other: ServerCert      # from another CA: its ca.pem is "the wrong CA" for our servers
    client: ClientCert     # a client certificate from the trusted CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    base.chmod(0o755)  # the servers copy their files, but libpq and aiormq read them as we do
    ca, other_ca = trustme.CA(), trustme.CA()
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    return Pki(
        good=ServerCert.issue(ca, base / "good", "localhost"),
        expired=ServerCert.issue(ca, base / "expired", "localhost", not_after=past),
        other=ServerCert.issue(other_ca, base / "other", "localhost"),
        client=ClientCert.issue(ca, base / "client", "relay", common_name="outbox-relay"),
    )


@pytest.fixture(scope="module")
def node(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    with RabbitNode(tmp_path_factory.mktemp("rabbit"), tls=pki.good, verify_peer=True) as n:
        yield n


@pytest.fixture(scope="module")
def expired_node(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    with RabbitNode(tmp_path_factory.mktemp("rabbit-expired"), tls=pki.expired) as n:
        yield n


@pytest.fixture(scope="module")
def pg(pki: Pki) -> Iterator[PgServer]:
    with PostgresPair(tls=pki.good, standby=False) as pair:
        yield pair.primary


def good_amqp(node: RabbitNode, pki: Pki, client_cert: bool = True) -> str:
    if client_cert:
        return node.amqps_url(cafile=pki.good.ca, certfile=pki.client.cert,
                              keyfile=pki.client.key)
    return node.amqps_url(cafile=pki.good.ca)


def good_db(pg: PgServer, pki: Pki, client_cert: bool = True) -> str:
    if client_cert:
        return pg.tls_url(sslrootcert=pki.good.ca, sslcert=pki.client.cert,
                          sslkey=pki.client.key)
    return pg.tls_url(sslrootcert=pki.good.ca)


@pytest.fixture
def tls_settings(node: RabbitNode, pg: PgServer, pki: Pki) -> Iterator[Settings]:
    """A migrated schema on the TLS PostgreSQL, reached over TLS, and the TLS node."""
    schema = support.unique("tls")
    settings = support.make_settings(schema, database_url=good_db(pg, pki),
                                     amqp_url=good_amqp(node, pki))
    migrate.upgrade(settings)
    yield settings
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
            sql.Identifier(schema)))


# -- what the three clients say ------------------------------------------------------------------

def run_doctor(settings: Settings) -> tuple[int, list[str]]:
    out = subprocess.run(support.outbox_cmd("doctor"), env=support.relay_env(settings),
                         capture_output=True, text=True, timeout=90)
    assert "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr
    return out.returncode, out.stdout.splitlines()




async def relay_refusal(settings: Settings, component: str) -> str:
    """Start `outbox relay` against a refusing peer; returns the one error line it logs about
    ``component`` ("broker" or "database") after checking that it says so once, stays up and
    not ready with that reason, and stops cleanly."""
    port = support.free_port()
    relay = RelayProcess(settings, OUTBOX_HTTP_PORT=str(port))
    try:
        line = await relay.wait_log(f'"{component} unavailable"', 60)
        error = str(orjson.loads(line)["error"])
        await support.until(lambda: support.http_get(port, "/readyz")[0] == 503, 30,
                            "/readyz answering 503")
        status, body = support.http_get(port, "/readyz")
        ready = orjson.loads(body)
        assert status == 503 and ready["problems"][component] == error, ready
        assert relay.alive, relay.log_tail()
        # retried slowly: the same refusal is not logged again (REFUSED_RETRY is 30 s)
        assert len(relay.logged(f'"{component} unavailable"')) == 1, relay.log_tail()
        assert not relay.logged("Traceback|unexpected error"), relay.log_tail()
        assert len(relay.logged('"level":"(error|critical)"')) == 1, relay.log_tail()
        relay.kill(15)  # SIGTERM
        assert await relay.wait(30) == 0, relay.log_tail()
        return error
    finally:
        relay.stop()


class ErrorLines(logging.Handler):
    """The consumer's error records, with their ``error`` field."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[tuple[str, str]] = []
        self.tracebacks = 0

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", {})
        self.records.append((record.getMessage(), str(fields.get("error", ""))))
        self.tracebacks += record.exc_info is not None


async def consumer_refusal(settings: Settings, queue: str, message: str) -> str:
    """Run the inbox consumer until it logs ``message``; returns that record's error."""
    errors = ErrorLines()
    logger = logging.getLogger("outbox.consumer")
    logger.addHandler(errors)

    async def handle(tx: Any, m: Message) -> None:
        raise AssertionError("no message may be handled without its database")

    consumer = Consumer(queue, handle, settings=settings)
    try:
        await consumer.start()
        try:
            await support.until(lambda: any(m == message for m, _ in errors.records), 60,
                                "the refusal logged")
        finally:
            await consumer.close()
    finally:
        logger.removeHandler(errors)
    matching = [e for m, e in errors.records if m == message]
    assert len(matching) == 1, errors.records  # said once, not once per retry
    assert errors.tracebacks == 0, "a traceback where one line was promised"
    return matching[0]


# -- it works ------------------------------------------------------------------------------------

@pytest.mark.parametrize("client_cert", [False, True], ids=["server-cert", "mutual"])
async def test_relay_and_consumer_deliver_over_tls(
        tls_settings: Settings, node: RabbitNode, pg: PgServer, pki: Pki,
        client_cert: bool) -> None:
    settings = tls_settings.replace(database_url=good_db(pg, pki, client_cert),
                                    amqp_url=good_amqp(node, pki, client_cert))
    queue = support.unique("tls_q")
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {}.effects (message_id uuid, tls bool)").format(
            sql.Identifier(settings.schema)))
        ids = [r[0] for r in conn.execute(sql.SQL(
            "INSERT INTO {}.outbox (routing_key, payload) "
            "SELECT %s, jsonb_build_object('n', g) FROM generate_series(1, %s) g "
            "RETURNING message_id").format(sql.Identifier(settings.schema)),
            (queue, ROWS)).fetchall()]
    await support.declare_queue(queue, settings.amqp_url)

    relay = subprocess.run(support.outbox_cmd("relay", "--drain"),
                           env=support.relay_env(settings), capture_output=True, text=True,
                           timeout=120)
    assert relay.returncode == 0, relay.stderr[-2000:]

    insert = sql.SQL("INSERT INTO {}.effects SELECT %s, ssl FROM pg_stat_ssl "
                     "WHERE pid = pg_backend_pid()").format(sql.Identifier(settings.schema))

    async def handle(tx: Any, m: Message) -> None:
        await tx.execute(insert, (m.message_id,))

    consumer = Consumer(queue, handle, settings=settings, declare=False)
    await consumer.start()
    try:
        await support.until(lambda: consumer.counts.applied >= ROWS, 60,
                            "every row applied")
        if client_cert:  # the broker saw and accepted our certificate
            listing = rabbitmqctl(node, "list_connections", "ssl", "peer_cert_subject")
            assert "CN=outbox-relay" in listing, listing
    finally:
        await consumer.close()

    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        effects = conn.execute(sql.SQL("SELECT message_id, tls FROM {}.effects").format(
            sql.Identifier(settings.schema))).fetchall()
        left = conn.execute(sql.SQL("SELECT count(*) FROM {}.outbox").format(
            sql.Identifier(settings.schema))).fetchone()
        if client_cert:  # PostgreSQL saw our certificate too
            row = conn.execute("SELECT client_dn FROM pg_stat_ssl "
                               "WHERE pid = pg_backend_pid()").fetchone()
            # client_dn is cut at 63 characters
            assert row is not None and "/CN=outbox" in str(row[0]), row
    delivered = {r[0] for r in effects}
    assert delivered == set(ids), "every row delivered"
    assert len(effects) == ROWS, "no duplicate effect"
    assert all(r[1] for r in effects), "the consumer's database connection was TLS"
    assert left == (0,), "nothing pending, nothing dead"
    assert consumer.counts.duplicates == 0


def test_doctor_says_ok_over_tls(tls_settings: Settings) -> None:
    code, lines = run_doctor(tls_settings)
    assert code == 0, "\n".join(lines)
    assert not [line for line in lines if line.startswith("FAIL")], lines
    for check in ("database", "broker", "publish"):
        assert [line for line in lines if line.split()[:2] == ["ok", check]], (check, lines)


# -- the refusals --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Refused:
    name: str
    words: str  # what the one line must say


BROKER_CASES = [
    Refused("wrong-ca", "TLS: certificate verify failed: self-signed certificate in certificate "
            "chain (the broker's certificate is not signed by a trusted CA: check cafile)"),
    Refused("expired", "TLS: certificate verify failed: certificate has expired"),
    Refused("host-mismatch", "TLS: certificate verify failed: IP address mismatch, certificate "
            "is not valid for '127.0.0.1'"),
    Refused("missing-cafile", "TLS: cannot load cafile=/nonexistent/ca.pem (No such file or "
            "directory)"),
    # Not a case: a client certificate the broker does not trust. Under TLS 1.3 the broker
    # refuses it after the client's handshake is done, and the client reads either the alert
    # (then "TLS: the broker refused the client certificate (tlsv1 alert unknown ca)") or a
    # reset connection, depending on timing; a reset cannot be told from an outage.
]


def refused_amqp(case: str, node: RabbitNode, expired_node: RabbitNode, pki: Pki) -> str:
    if case == "wrong-ca":
        return node.amqps_url(cafile=pki.other.ca)
    if case == "expired":
        return expired_node.amqps_url(cafile=pki.good.ca)
    if case == "host-mismatch":
        return node.amqps_url("127.0.0.1", cafile=pki.good.ca)
    if case == "missing-cafile":
        return node.amqps_url(cafile="/nonexistent/ca.pem")
    raise AssertionError(case)


async def doctor_and_relay_refuse(settings: Settings, side: str, words: str) -> None:
    """`outbox doctor` fails with one line naming the cause, and the relay logs that cause in
    one line (its own error line, once)."""
    code, lines = run_doctor(settings)
    assert code == 1, lines
    (fail,) = [line for line in lines if line.startswith("FAIL") and f" {side} " in line]
    assert words in fail, fail
    error = await relay_refusal(settings, side)
    assert words in error, error
    assert "\n" not in error


@pytest.mark.parametrize("case", BROKER_CASES, ids=lambda c: c.name)
async def test_broker_refusal_is_one_line_everywhere(
        tls_settings: Settings, node: RabbitNode, expired_node: RabbitNode, pki: Pki,
        case: Refused) -> None:
    settings = tls_settings.replace(amqp_url=refused_amqp(case.name, node, expired_node, pki))

    await doctor_and_relay_refuse(settings, "broker", case.words)

    error = await consumer_refusal(settings, support.unique("tls_q"), "broker unavailable")
    assert case.words in error, error
    assert "cannot connect" not in error


DATABASE_CASES = [
    # libpq says only "certificate verify failed"; the store asks OpenSSL why
    Refused("wrong-ca", "TLS: certificate verify failed: self-signed certificate in certificate "
            "chain (the server certificate is not signed by the CA of sslrootcert)"),
    Refused("host-mismatch", 'TLS: hostname mismatch: server certificate for "localhost" does '
            'not match host name "127.0.0.1"'),
    Refused("expired", "TLS: certificate verify failed: certificate has expired"),
]


@pytest.fixture
def database_case(request: pytest.FixtureRequest, pg: PgServer, pki: Pki) -> Iterator[str]:
    """The refused database URL of the case; "expired" serves the expired certificate for the
    test's duration."""
    case: Refused = request.param
    if case.name == "wrong-ca":
        yield pg.tls_url(sslrootcert=pki.other.ca)
    elif case.name == "host-mismatch":
        yield pg.tls_url("127.0.0.1", sslrootcert=pki.good.ca)
    else:
        pg.use_tls(pki.expired)
        try:
            yield pg.tls_url(sslrootcert=pki.good.ca)
        finally:
            pg.use_tls(pki.good)


@pytest.fixture
async def waiting_message(tls_settings: Settings) -> AsyncIterator[str]:
    """A queue with one message in it, so the consumer needs its database."""
    queue = support.unique("tls_q")
    conn = await aiormq.connect(tls_settings.amqp_url)
    try:
        ch = await conn.channel()
        await ch.queue_declare(queue, durable=True)
        await ch.basic_publish(b'{"n": 1}', routing_key=queue,
                               properties=aiormq.spec.Basic.Properties(
                                   message_id=str(uuid.uuid4())))
        yield queue
    finally:
        await conn.close()


@pytest.mark.parametrize("database_case", DATABASE_CASES, indirect=True,
                         ids=lambda c: c.name)
async def test_database_refusal_is_one_line_everywhere(
        tls_settings: Settings, database_case: str, waiting_message: str,
        request: pytest.FixtureRequest) -> None:
    case: Refused = request.node.callspec.params["database_case"]
    settings = tls_settings.replace(database_url=database_case)

    await doctor_and_relay_refuse(settings, "database", case.words)

    error = await consumer_refusal(settings, waiting_message,
                                   "database unavailable; holding the batch")
    assert case.words in error, error

