"""Throwaway certificates for TLS tests, from a test CA made by trustme.

    ca = trustme.CA()
    server = ServerCert.issue(ca, tmp_path / "good", "localhost")          # valid for localhost
    expired = ServerCert.issue(ca, tmp_path / "old", "localhost",
                               not_after=datetime.now(UTC) - timedelta(days=1))
    client = ClientCert.issue(ca, tmp_path / "client", "relay", common_name="outbox-relay")

Each is a directory of PEM files: ``ca.pem`` (the CA that signed it), ``cert.pem`` and ``key.pem``.
A server (tests/rabbit_node.py, tests/postgres_pair.py) copies them to where its own user can read
them; a client names them in its URL (``cafile``/``certfile``/``keyfile`` for amqps,
``sslrootcert``/``sslcert``/``sslkey`` for libpq).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class ServerCert:
    """A certificate, its key and the CA that signed it, as PEM files."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def issue(cls, ca: trustme.CA, directory: Path, *identities: str,
              common_name: str | None = None,
              not_after: datetime.datetime | None = None) -> ServerCert:
        """Issue a certificate for ``identities`` (host names or IP addresses; the subject's
        CN is ``common_name``, e.g. a client's user name) and write it."""
        directory.mkdir(parents=True, exist_ok=True)
        leaf = ca.issue_cert(*identities, common_name=common_name, not_after=not_after)
        files = cls(ca=directory / "ca.pem", cert=directory / "cert.pem",
                    key=directory / "key.pem")
        ca.cert_pem.write_to_path(str(files.ca))
        with files.cert.open("wb") as out:
            for pem in leaf.cert_chain_pems:
                out.write(pem.bytes())
        leaf.private_key_pem.write_to_path(str(files.key))
        files.key.chmod(0o600)  # libpq refuses a client key that others may read
        return files


ClientCert = ServerCert  # the same three files; trustme's leaf certificates allow both uses
