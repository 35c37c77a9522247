"""The e-mail channel against a real SMTP server (aiosmtpd): STARTTLS and implicit TLS with the
development CA, a login, a plain-text and an HTML part; a refused login is not retried."""

from __future__ import annotations

import asyncio
import email
import ssl
import uuid
from collections.abc import Iterator
from email.message import Message
from email.policy import default
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from checker_processing.alerting.commands import sample_notification
from checker_processing.alerting.config import EmailChannel, parse
from checker_processing.alerting.delivery import Delivered, Refused
from checker_processing.alerting.mail import send
from devstack import free_port

PASSWORD = "smtp-pa55-secret"


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, Message]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.messages.append((envelope, email.message_from_bytes(envelope.content, policy=default)))
        return "250 OK"


def authenticator(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
        b"alerts",
        PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False)  # the server answers 535 itself


@pytest.fixture
def tls(dev_certs: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(dev_certs / "broker.pem", dev_certs / "broker.key")
    return context


def serve(mailbox: Mailbox, tls: ssl.SSLContext, *, implicit: bool) -> Controller:
    port = free_port()
    if implicit:
        controller = Controller(
            mailbox, hostname="127.0.0.1", port=port, ssl_context=tls,
            authenticator=authenticator, auth_require_tls=False
        )  # fmt: skip
    else:
        controller = Controller(
            mailbox, hostname="127.0.0.1", port=port, tls_context=tls, require_starttls=True,
            authenticator=authenticator
        )  # fmt: skip
    controller.start()
    return controller


@pytest.fixture
def mailbox() -> Mailbox:
    return Mailbox()


@pytest.fixture
def starttls_server(mailbox: Mailbox, tls: ssl.SSLContext) -> Iterator[Controller]:
    controller = serve(mailbox, tls, implicit=False)
    yield controller
    controller.stop()


@pytest.fixture
def tls_server(mailbox: Mailbox, tls: ssl.SSLContext) -> Iterator[Controller]:
    controller = serve(mailbox, tls, implicit=True)
    yield controller
    controller.stop()


def channel(port: int, dev_certs: Path, security: str, password: str = PASSWORD) -> EmailChannel:
    config = parse(
        f"""
[channels.mail]
type = "email"
host = "localhost"
port = {port}
security = "{security}"
username = "alerts"
password = "{password}"
ca_file = "{dev_certs / "ca.pem"}"
from_address = "checker@example.test"
to = ["oncall@example.test", "team@example.test"]
"""
    )
    found = config.channels["mail"]
    assert isinstance(found, EmailChannel)
    return found


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_a_notification_arrives_as_text_and_html_over_tls_with_a_login(
    security: str,
    mailbox: Mailbox,
    dev_certs: Path,
    request: pytest.FixtureRequest,
) -> None:
    server = request.getfixturevalue(f"{security}_server")
    body = sample_notification("mail")
    outcome = asyncio.run(send(channel(server.port, dev_certs, security), body))
    assert outcome == Delivered()
    ((envelope, mail),) = mailbox.messages
    assert envelope.rcpt_tos == ["oncall@example.test", "team@example.test"]
    assert mail["Subject"] == body.summary
    assert mail["Message-ID"] == f"<{body.notification_id}@periodic-checker>"
    parts = {part.get_content_type(): part.get_payload(decode=True).decode() for part in mail.walk()
             if not part.is_multipart()}  # fmt: skip
    assert set(parts) == {"text/plain", "text/html"}
    assert parts["text/plain"].startswith(body.summary)
    assert "<table>" in parts["text/html"]
    assert str(uuid.UUID(mail["X-Checker-Notification-Id"])) == str(body.notification_id)


def test_a_refused_login_is_refused_not_retried(
    starttls_server: Controller, mailbox: Mailbox, dev_certs: Path
) -> None:
    outcome = asyncio.run(
        send(
            channel(starttls_server.port, dev_certs, "starttls", "wrong"),
            sample_notification("mail"),
        )
    )
    assert isinstance(outcome, Refused)
    assert outcome.error.startswith("SMTP 535")
    assert PASSWORD not in outcome.error
    assert mailbox.messages == []


def test_a_login_without_tls_is_refused_in_the_file() -> None:
    with pytest.raises(ValueError, match="security: a login needs starttls or tls"):
        parse(
            '[channels.m]\ntype = "email"\nhost = "h"\nsecurity = "none"\nusername = "u"\n'
            'password = "p"\nfrom_address = "a@b"\nto = ["c@d"]\n'
        )
