"""The e-mail channel: one message per notification (or summary) over SMTP (smtplib, in a worker
thread), with a plain-text and an HTML part; its Message-ID is made from the notification id, so
a mail system that keeps ids sees a repeat as the same message.

SMTP answers 4xx for "later" and 5xx for "never": a 4xx (and connection trouble) is tried
again, a 5xx (a refused login, an unknown recipient) is not.
"""

from __future__ import annotations

import asyncio
import html
import smtplib
import ssl
from email.message import EmailMessage

from checker_processing.alerting.config import EmailChannel
from checker_processing.alerting.delivery import Delivered, Outcome, Refused, TryAgain
from checker_processing.alerting.message import Body, NotificationBody, SummaryBody


def message(channel: EmailChannel, body: Body) -> EmailMessage:
    """The mail (pure)."""
    mail = EmailMessage()
    mail["Subject"] = body.summary[:200]
    mail["From"] = channel.from_address
    mail["To"] = ", ".join(channel.to)
    mail["Message-ID"] = f"<{body.notification_id}@periodic-checker>"
    mail["X-Checker-Notification-Id"] = str(body.notification_id)
    rows = _summary_rows(body) if isinstance(body, SummaryBody) else _rows(body)
    text = body.summary + "\n\n" + "\n".join(f"{k}: {v}" for k, v in rows) + "\n"
    cells = "".join(
        f"<tr><th align='left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows
    )
    mail.set_content(text)
    mail.add_alternative(
        f"<html><body><p><b>{html.escape(body.summary)}</b></p><table>{cells}</table>"
        "</body></html>",
        subtype="html",
    )
    return mail


def _rows(body: NotificationBody) -> list[tuple[str, str]]:
    incident = body.incident
    error = incident.first_error
    return [
        ("Task", body.task.name or str(body.task.id)),
        ("URL", body.task.url or "-"),
        ("Tags", ", ".join(body.task.tags) or "-"),
        ("Down since", incident.started_at.isoformat()),
        ("Ended", incident.ended_at.isoformat() if incident.ended_at else "-"),
        ("First error", f"{error.kind}: {error.message or ''}".rstrip(": ") if error else "-"),
        ("Notification", f"{body.kind} {body.notification_id}"),
    ]


def _summary_rows(body: SummaryBody) -> list[tuple[str, str]]:
    """A row per task it names, then the count of the others."""
    rows: list[tuple[str, str]] = [(i.kind, i.task_name or str(i.task_id)) for i in body.first]
    if body.more:
        rows.append(("and", f"{body.more} more"))
    return [*rows, ("Notification", f"summary {body.notification_id}")]


def _send(channel: EmailChannel, mail: EmailMessage) -> Outcome:
    context = ssl.create_default_context(cafile=channel.ca_file)
    timeout = channel.timeout_seconds
    try:
        smtp: smtplib.SMTP
        if channel.security == "tls":
            smtp = smtplib.SMTP_SSL(
                channel.host, channel.smtp_port, timeout=timeout, context=context
            )
        else:
            smtp = smtplib.SMTP(channel.host, channel.smtp_port, timeout=timeout)
        with smtp:
            if channel.security == "starttls":
                smtp.starttls(context=context)
            if channel.username is not None and channel.password is not None:
                smtp.login(channel.username, channel.password.get_secret_value())
            smtp.send_message(mail)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = sorted({code for code, _ in exc.recipients.values()})
        text = f"recipients refused ({', '.join(map(str, codes))})"
        return TryAgain(text) if all(400 <= c < 500 for c in codes) else Refused(text)
    except smtplib.SMTPResponseException as exc:
        reply = (
            exc.smtp_error.decode("utf-8", "replace")
            if isinstance(exc.smtp_error, bytes)
            else str(exc.smtp_error)
        )
        text = f"SMTP {exc.smtp_code}: {' '.join(reply.split())}"
        return TryAgain(text) if 400 <= exc.smtp_code < 500 else Refused(text)
    except (smtplib.SMTPException, ssl.SSLError, OSError) as exc:
        return TryAgain(f"{type(exc).__name__}: {' '.join(str(exc).split()) or 'no detail'}")
    return Delivered()


async def send(channel: EmailChannel, body: Body) -> Outcome:
    # smtplib blocks: in a worker thread, so the other notifications of the round go on.
    return await asyncio.to_thread(_send, channel, message(channel, body))
