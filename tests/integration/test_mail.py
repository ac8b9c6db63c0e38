"""Email that is never lost: outbox, sender, transports and limits against a
real SMTP server (aiosmtpd on 127.0.0.1) and both databases."""

from __future__ import annotations

import asyncio
import inspect
import secrets
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from iam_grpc.app import Application
from iam_grpc.errors import RateLimited
from iam_grpc.storage.records import OutboxMessage
from iam_grpc.testing import running_service, service_settings
from tests.conftest import Backend
from tests.mailbox import Mailbox

FAST = {"IAM_MAIL__POLL_INTERVAL": "100ms", "IAM_MAIL__RETRY_BACKOFF": '["1s"]'}


def address() -> str:
    return f"user.{secrets.token_hex(4)}@example.com"


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox()
    box.start()
    yield box
    box.stop()


def env(backend: Backend, mailbox: Mailbox, **extra: str) -> dict[str, str]:
    return {**backend.isolated(), "IAM_SMTP_URL": mailbox.url, **FAST, **extra}


async def queue_reset(
    app: Application,
    to: str,
    *,
    link: str = "https://app.example/auth/reset-password?token=abc",
    name: str = "Zoë <b>",
) -> int:
    async with app.components.db.transaction() as tx:
        message_id = await app.components.mailer.queue(
            tx,
            "password_reset",
            to,
            params={"name": name, "minutes_left": 20, "device": "Firefox on Linux", "location": "Berlin, DE"},
            secrets={"link": link},
            not_after=app.clock.now() + timedelta(minutes=20),
            user_id="01JTESTUSER0000000000000000"[:26],
        )
    assert message_id is not None
    return message_id


async def row(app: Application, message_id: int) -> OutboxMessage:
    async with app.components.db.transaction() as tx:
        found = await tx.outbox.get(message_id)
    assert found is not None
    return found


async def wait_for(predicate: Callable[[], object], seconds: float = 10.0) -> None:
    """Poll ``predicate`` (plain or async) until it is true, failing after ``seconds``."""
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        outcome = predicate()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


async def test_a_queued_email_is_delivered_with_both_bodies(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """Delivery over SMTP: multipart text + HTML, link in the bodies only, markup escaped in HTML, secrets wiped."""
    to = address()
    link = "https://app.example/auth/reset-password?token=" + secrets.token_urlsafe(24)
    async with running_service(tmp_path, env(backend, mailbox)) as iam:
        message_id = await queue_reset(iam.app, to, link=link)
        await wait_for(lambda: bool(mailbox.to(to)))
        # The SMTP server has the message before the sender commits the row's new state.
        await wait_for(lambda: _status(iam.app, message_id, "sent"))
        sent = await row(iam.app, message_id)
    (email,) = mailbox.to(to)
    assert email.get_content_type() == "multipart/alternative"
    text = email.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    html = email.get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]
    assert link in text
    assert link.replace("&", "&amp;") in html
    assert link not in email["Subject"]
    assert "Zoë <b>" in text
    assert "Zoë &lt;b&gt;" in html
    assert email["From"] == "IAM <no-reply@localhost>"
    assert email["Message-ID"].startswith(f"<iam-{message_id}.")
    assert (sent.status, sent.sealed_params, sent.attempts) == ("sent", None, 1)
    assert sent.provider_message_id == email["Message-ID"]


async def test_smtp_down_keeps_mail_until_it_comes_back(backend: Backend, tmp_path: Path) -> None:
    """With SMTP down the queueing succeeds, the row waits with rising attempts, and is delivered once SMTP is back (S60)."""
    box = Mailbox()  # not started yet
    to = address()
    async with running_service(tmp_path, env(backend, box)) as iam:
        message_id = await queue_reset(iam.app, to)
        await wait_for(lambda: _attempted(iam.app, message_id))
        waiting = await row(iam.app, message_id)
        assert waiting.status == "pending"
        assert waiting.last_error is not None
        assert waiting.last_error.startswith("connection failed")
        assert waiting.sealed_params is not None
        box.start()
        try:
            await wait_for(lambda: bool(box.to(to)), seconds=15)
        finally:
            box.stop()
        await wait_for(lambda: _status(iam.app, message_id, "sent"))


async def _attempted(app: Application, message_id: int) -> bool:
    return (await row(app, message_id)).attempts >= 1


async def _status(app: Application, message_id: int, status: str) -> bool:
    return (await row(app, message_id)).status == status


async def test_pending_mail_survives_a_restart(backend: Backend, mailbox: Mailbox, tmp_path: Path) -> None:
    """Mail queued by a process that stopped before sending is delivered by the next one."""
    to = address()
    environ = env(backend, mailbox)
    mailbox.mode = "temporary"
    async with running_service(tmp_path, environ) as first:
        message_id = await queue_reset(first.app, to)
        await wait_for(lambda: _attempted(first.app, message_id))
    mailbox.mode = "accept"
    async with running_service(tmp_path, environ) as second:
        await wait_for(lambda: _status(second.app, message_id, "sent"), seconds=15)
    assert len(mailbox.to(to)) == 1


async def test_two_replicas_send_each_message_exactly_once(
    shared_backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """Two replicas' senders on one MariaDB: 40 messages, 40 deliveries, 40 distinct Message-IDs."""
    environ = env(shared_backend, mailbox)
    recipients = [address() for _ in range(40)]
    async with running_service(tmp_path / "a", environ) as a, running_service(tmp_path / "b", environ) as b:
        for index, to in enumerate(recipients):
            await queue_reset((a if index % 2 else b).app, to)
        await wait_for(lambda: sum(len(mailbox.to(to)) for to in recipients) >= 40, seconds=20)
        await asyncio.sleep(0.5)  # give any duplicate a chance to show up
    delivered = [m for to in recipients for m in mailbox.to(to)]
    assert len(delivered) == 40
    assert len({m["Message-ID"] for m in delivered}) == 40


async def test_temporary_failures_retry_then_dead_letter(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """4xx answers retry on the backoff schedule; after mail.max_attempts the row is dead, secrets wiped."""
    mailbox.mode = "temporary"
    to = address()
    async with running_service(tmp_path, env(backend, mailbox, IAM_MAIL__MAX_ATTEMPTS="3")) as iam:
        message_id = await queue_reset(iam.app, to)
        await wait_for(lambda: _status(iam.app, message_id, "dead"), seconds=15)
        dead = await row(iam.app, message_id)
    assert (dead.attempts, dead.sealed_params) == (3, None)
    assert dead.last_error == "SMTP 451 server refused the message"
    assert mailbox.to(to) == []


async def test_permanent_failures_dead_letter_at_once(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """A 5xx answer is final: dead after one attempt, with the code and a fixed text only (S51)."""
    mailbox.mode = "permanent"
    to = address()
    async with running_service(tmp_path, env(backend, mailbox)) as iam:
        message_id = await queue_reset(iam.app, to)
        await wait_for(lambda: _status(iam.app, message_id, "dead"))
        dead = await row(iam.app, message_id)
    assert (dead.attempts, dead.sealed_params, dead.last_error) == (
        1,
        None,
        "SMTP 550 server refused the message",
    )
    assert to not in (dead.last_error or "")


async def test_mail_past_its_deadline_is_never_sent(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """A code that stopped working is not mailed: the row expires and its secrets are wiped (S60)."""
    to = address()
    async with running_service(tmp_path, env(backend, mailbox)) as iam:
        async with iam.app.components.db.transaction() as tx:
            message_id = await iam.app.components.mailer.queue(
                tx,
                "mfa_code",
                to,
                params={
                    "reason_text": "new device",
                    "device": "d",
                    "location": "",
                    "time_utc": "t",
                    "minutes_left": 10,
                },
                secrets={"code": "123456", "link": "https://app.example/auth/mfa?token=x"},
                not_after=iam.app.clock.now() - timedelta(seconds=1),
                user_id="01JTESTUSER00000000000000X",
            )
        assert message_id is not None
        await wait_for(lambda: _status(iam.app, message_id, "expired"))
        expired = await row(iam.app, message_id)
    assert expired.sealed_params is None
    assert mailbox.to(to) == []


async def test_per_recipient_limits_refuse_codes_and_suppress_notices(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """The 11th email to one address in an hour: a code or link is RATE_LIMITED, a notice is stored suppressed;
    other recipients are unaffected (S16)."""
    victim = address()
    async with running_service(tmp_path, env(backend, mailbox)) as iam:
        for _ in range(10):
            await queue_reset(iam.app, victim)
        with pytest.raises(RateLimited) as refused:
            await queue_reset(iam.app, victim)
        assert refused.value.metadata == {"scope": "email"}
        async with iam.app.components.db.transaction() as tx:
            notice = await iam.app.components.mailer.queue(
                tx,
                "password_changed",
                victim,
                params={"time_utc": "t", "device": "d", "location": ""},
                user_id="01JTESTUSER00000000000000Y",
            )
        assert notice is not None
        assert (await row(iam.app, notice)).status == "suppressed"
        other = address()
        await queue_reset(iam.app, other)
        await wait_for(lambda: bool(mailbox.to(other)))


async def test_challenge_mail_is_limited_per_user(backend: Backend, mailbox: Mailbox, tmp_path: Path) -> None:
    """A user receives at most 8 challenge emails a day, whatever the addresses (behaviour.md 7.4)."""
    user = "01JTESTUSERLIMIT" + secrets.token_hex(5).upper()[:10]
    async with running_service(tmp_path, env(backend, mailbox)) as iam:

        async def challenge() -> None:
            async with iam.app.components.db.transaction() as tx:  # type: ignore[union-attr]
                await iam.app.components.mailer.queue(  # type: ignore[union-attr]
                    tx,
                    "mfa_code",
                    address(),
                    params={
                        "reason_text": "r",
                        "device": "d",
                        "location": "",
                        "time_utc": "t",
                        "minutes_left": 10,
                    },
                    secrets={"code": "000001", "link": "https://x/auth/mfa?token=y"},
                    not_after=iam.app.clock.now() + timedelta(minutes=10),
                    user_id=user,
                    ip=f"198.51.100.{secrets.randbelow(200)}",
                )

        for _ in range(8):
            await challenge()
        with pytest.raises(RateLimited) as refused:
            await challenge()
    assert refused.value.metadata == {"scope": "user"}


async def test_notice_bursts_send_one_email(backend: Backend, mailbox: Mailbox, tmp_path: Path) -> None:
    """Two new-device notices for one user and device are one row (dedupe key)."""
    to = address()
    async with running_service(tmp_path, env(backend, mailbox)) as iam:
        ids = []
        for _ in range(3):
            async with iam.app.components.db.transaction() as tx:
                ids.append(
                    await iam.app.components.mailer.queue(
                        tx,
                        "new_device",
                        to,
                        params={"device": "d", "location": "", "time_utc": "t"},
                        user_id="01JTESTUSER00000000000000Z",
                        dedupe_scope="dev_x",
                    )
                )
        await wait_for(lambda: bool(mailbox.to(to)))
        await asyncio.sleep(0.3)
    assert ids[0] is not None
    assert ids[1:] == [None, None]
    assert len(mailbox.to(to)) == 1


async def test_embedded_mode_writes_private_eml_files(tmp_path: Path) -> None:
    """Without SMTP, messages land in <data_dir>/outbox as .eml files with mode 0600; logs hold no secret."""
    link = "https://app.example/auth/reset-password?token=" + secrets.token_urlsafe(24)
    async with running_service(tmp_path, FAST) as iam:
        message_id = await queue_reset(iam.app, address(), link=link)
        await wait_for(lambda: _status(iam.app, message_id, "sent"))
    (eml,) = (tmp_path / "outbox").glob("*.eml")
    assert oct(eml.stat().st_mode & 0o777) == "0o600"
    assert link in eml.read_text()
    assert link not in eml.name


async def test_templates_follow_the_users_language_with_english_fallback(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """An operator's fr/password_reset.* is used for a French user; a missing part falls back to English."""
    templates = tmp_path / "templates" / "fr"
    templates.mkdir(parents=True)
    (templates / "password_reset.subject").write_text("Réinitialisez votre mot de passe {{ site_name }}")
    (templates / "password_reset.txt").write_text("Bonjour,\nLien : {{ link }}\n")
    to = address()
    async with running_service(
        tmp_path / "data", env(backend, mailbox, IAM_MAIL__TEMPLATES_DIR=str(tmp_path / "templates"))
    ) as iam:
        assert "fr" in iam.app.components.renderer.locales()
        async with iam.app.components.db.transaction() as tx:
            await iam.app.components.mailer.queue(
                tx,
                "password_reset",
                to,
                params={"minutes_left": 20, "device": "d", "location": ""},
                secrets={"link": "https://app.example/auth/reset-password?token=fr"},
                locale="fr",
                not_after=iam.app.clock.now() + timedelta(minutes=20),
            )
        await wait_for(lambda: bool(mailbox.to(to)))
    (email,) = mailbox.to(to)
    assert email["Subject"] == "Réinitialisez votre mot de passe IAM"
    assert (
        "Lien : https://app.example/auth/reset-password?token=fr"
        in email.get_body(preferencelist=("plain",)).get_content()
    )  # type: ignore[union-attr]
    assert "Choose a new password" in email.get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]


async def test_a_template_that_puts_a_secret_in_the_subject_is_refused(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """Codes never reach subjects (notification previews): such an override dead-letters the row instead."""
    templates = tmp_path / "templates" / "en"
    templates.mkdir(parents=True)
    (templates / "password_reset.subject").write_text("Your link: {{ link }}")
    to = address()
    async with running_service(
        tmp_path / "data", env(backend, mailbox, IAM_MAIL__TEMPLATES_DIR=str(tmp_path / "templates"))
    ) as iam:
        message_id = await queue_reset(iam.app, to)
        await wait_for(lambda: _status(iam.app, message_id, "dead"))
        assert (await row(iam.app, message_id)).last_error == "template places a secret in the subject"
    assert mailbox.to(to) == []


async def test_a_message_that_cannot_be_built_is_dead_and_its_batch_goes_on(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """A poison row (an address whose line break no mail header accepts) claimed in one batch with
    good rows: the good rows are delivered at once (not after their claims lapse), the poison row is
    dead with a reason that names no part of the message."""
    poison = "mallory\n@example.com"
    good = [address() for _ in range(3)]
    async with running_service(tmp_path, env(backend, mailbox)) as iam:
        ids: list[int] = []
        async with iam.app.components.db.transaction() as tx:  # one commit: one claim takes all four
            for to in [poison, *good]:
                message_id = await iam.app.components.mailer.queue(
                    tx,
                    "password_reset",
                    to,
                    params={"name": "M", "minutes_left": 20, "device": "Firefox", "location": ""},
                    secrets={"link": "https://app.example/auth/reset-password?token=abc"},
                    not_after=iam.app.clock.now() + timedelta(minutes=20),
                )
                assert message_id is not None
                ids.append(message_id)
        await wait_for(lambda: all(mailbox.to(to) for to in good), seconds=5)
        await wait_for(lambda: _status(iam.app, ids[0], "dead"), seconds=5)
        dead = await row(iam.app, ids[0])
        for message_id in ids[1:]:
            await wait_for(lambda message_id=message_id: _status(iam.app, message_id, "sent"))  # type: ignore[misc]
    assert dead.last_error == "message could not be built (ValueError)"
    assert (dead.attempts, dead.sealed_params) == (1, None)
    assert "mallory" not in (dead.last_error or "")


def test_locale_choice() -> None:
    """Stored locale first, then the best Accept-Language match, then the default."""
    from iam_grpc.mail.render import pick_locale

    available = {"en", "fr", "pt-br"}
    assert pick_locale(available, "fr", "de", "en") == "fr"
    assert pick_locale(available, None, "de-DE,fr-CA;q=0.8,en;q=0.5", "en") == "fr"
    assert pick_locale(available, None, "pt-BR", "en") == "pt-br"
    assert pick_locale(available, "xx", "zz;q=1, *;q=0.1", "en") == "en"


async def test_stopping_releases_claims(backend: Backend, mailbox: Mailbox, tmp_path: Path) -> None:
    """A stopping sender gives back rows it claimed but did not send."""
    settings = service_settings(tmp_path, env(backend, mailbox))
    app = Application(settings)
    await app.start()
    try:
        await app.components.sender.stop()  # no sender running: nothing claims
        mailbox.mode = "temporary"
        message_id = await queue_reset(app, address())
        async with app.components.db.transaction() as tx:
            claimed = await tx.outbox.claim(
                app.clock.now() + timedelta(minutes=1),
                app.components.sender.worker_id,
                10,
                timedelta(minutes=5),
            )
        assert message_id in {m.id for m in claimed}
        await app.components.sender.stop()
        assert (await row(app, message_id)).claimed_by is None
    finally:
        await app.stop(drain_delay=timedelta(0))
