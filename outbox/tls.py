"""What a failed TLS verification means, in words: shared by the broker's edge (`outbox.amqp`)
and the database's (`outbox.store`)."""

from __future__ import annotations

import ssl

# verify codes that mean "not signed by a CA we trust" (X509_V_ERR_*)
UNTRUSTED = frozenset({18, 19, 20, 21})


def ssl_text(exc: ssl.SSLError) -> str:
    """OpenSSL's words without the codes: "[SSL: X] tlsv1 alert unknown ca (_ssl.c:2580)" ->
    "tlsv1 alert unknown ca"."""
    text = str(exc.strerror or exc)
    text = text.split("] ", 1)[-1]
    return text.split(" (_ssl.c:", 1)[0]


def verify_failure(exc: ssl.SSLCertVerificationError, untrusted: str) -> str:
    """OpenSSL's reason ("certificate has expired"…), followed by ``untrusted`` in brackets when
    the certificate's chain leads to no CA we trust."""
    why = exc.verify_message or ssl_text(exc)
    return f"{why} ({untrusted})" if exc.verify_code in UNTRUSTED else why
