"""Secrets in a task's definition: how they are masked for showing, and how a mask written
back keeps the stored secret only where it would go to the same place (pure functions)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from checker_common.redact import redact_url
from checker_common.task_spec import TaskSpec
from periodic_checker.tasks import Task, kept_secrets, redacted

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pass@host/p?q#f", "https://user:***@host/p?q#f"),
        ("https://user:@host/", "https://user:***@host/"),
        ("https://t0ken@host/", "https://***@host/"),
        ("https://@host/", "https://***@host/"),
        ("http://u:p@ss@host:81/", "http://u:***@host:81/"),  # the last @ ends the user info
        ("http://u:p%40ss@host/", "http://u:***@host/"),
        ("HTTPS://u:p@host/", "HTTPS://u:***@host/"),
        ("https://host/path@x", "https://host/path@x"),  # an @ in the path is not user info
        ("https://host/?to=a@b", "https://host/?to=a@b"),
        ("https://host/", "https://host/"),
        ("not a url @ all", "not a url @ all"),
    ],
)
def test_a_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def spec(**fields: Any) -> TaskSpec:
    base: dict[str, Any] = {"name": "site", "url": "https://alice:s3cret@shop.example/health"}
    base.update(fields)
    return TaskSpec(**base)


STORED = spec(
    headers={"X-Api-Key": "k3y", "Authorization": "Bearer t0ken", "X-Trace": "1"},
    secret_headers=["x-api-key"],
)


def read_back(stored: TaskSpec) -> TaskSpec:
    """What a client gets from a read, validated as it would send it back."""
    task = Task(id=uuid.UUID(int=1), spec=stored, created_at=NOW, updated_at=NOW)
    return TaskSpec.model_validate(redacted(task).spec.model_dump())


def test_a_read_masks_the_password_and_every_secret_header() -> None:
    shown = read_back(STORED)

    assert shown.url == "https://alice:***@shop.example/health"
    assert shown.headers == {"X-Api-Key": "***", "Authorization": "***", "X-Trace": "1"}
    assert shown.secret_headers == ["x-api-key"]


def test_a_task_without_secrets_is_shown_as_it_is() -> None:
    task = Task(id=uuid.UUID(int=1), spec=spec(url="https://h/"), created_at=NOW, updated_at=NOW)
    assert redacted(task) is task


def test_what_was_read_written_back_keeps_every_stored_secret() -> None:
    assert kept_secrets(read_back(STORED), STORED) == STORED


def test_a_restored_definition_knows_its_secrets_again() -> None:
    # The probe masks these in error messages: none may be stale from the masked copy.
    sent = read_back(STORED)
    assert sent.secret_values == ()
    assert kept_secrets(sent, STORED).secret_values == STORED.secret_values
    assert set(STORED.secret_values) == {"s3cret", "k3y", "Bearer t0ken"}


def test_a_new_password_or_value_replaces_the_stored_one() -> None:
    sent = read_back(STORED).model_copy(
        update={"url": "https://alice:n3w@shop.example/other", "headers": {"X-Api-Key": "n3w"}}
    )
    assert kept_secrets(sent, STORED) == sent


def test_the_mask_keeps_the_password_on_another_path_of_the_same_origin() -> None:
    sent = read_back(STORED).model_copy(update={"url": "https://alice:***@shop.example/other"})
    assert kept_secrets(sent, STORED).url == "https://alice:s3cret@shop.example/other"


def test_the_place_of_a_password_is_read_as_the_probe_reads_the_url() -> None:
    """The host in another case, the default port spelled out, a raw "@" in the password:
    the same place to the probe (`TaskSpec.fetch_url`), so the mask keeps the password."""
    stored = spec(url="https://alice:p@ss@Shop.Example:443/health")
    sent = read_back(stored).model_copy(update={"url": "https://alice:***@shop.example/health"})
    kept = kept_secrets(sent, stored)
    assert (kept.fetch_url.user, kept.fetch_url.password) == ("alice", "p@ss")
    assert kept.fetch_url.raw_host == "shop.example"
    assert "p@ss" in kept.secret_values


def test_a_password_is_masked_as_the_url_spells_it_and_as_it_is_sent() -> None:
    assert set(spec(url="https://alice:p%40ss@shop.example/").secret_values) == {"p%40ss", "p@ss"}
    assert spec(url="https://t%30ken@git.example/").secret_values == ("t0ken",)


def test_a_lone_user_token_is_masked_and_kept() -> None:
    stored = spec(url="https://t0ken@git.example/repo")
    sent = read_back(stored)
    assert sent.url == "https://***@git.example/repo"
    assert kept_secrets(sent, stored) == stored


@pytest.mark.parametrize(
    ("url", "headers", "secret_headers", "field"),
    [
        ("https://alice:***@evil.example/health", None, None, "url"),
        ("https://alice:***@shop.example:8443/health", None, None, "url"),
        ("http://alice:***@shop.example/health", None, None, "url"),
        ("https://mallory:***@shop.example/health", None, None, "url"),
        ("https://***@shop.example/health", None, None, "url"),
        # The value would go to another origin: the new URL gives its own password.
        ("https://alice:pw@evil.example/", {"X-Api-Key": "***"}, None, "headers.X-Api-Key"),
        # A header that was not secret has no hidden value to keep.
        (None, {"X-Trace": "***"}, ["X-Trace"], "headers.X-Trace"),
        (None, {"Cookie": "***"}, None, "headers.Cookie"),
    ],
    ids=[
        "other-host",
        "other-port",
        "other-scheme",
        "other-user",
        "user-dropped",
        "header-to-another-origin",
        "header-not-secret-before",
        "credential-header-never-stored",
    ],
)
def test_a_mask_is_refused_where_the_secret_would_go_elsewhere(
    url: str | None,
    headers: dict[str, str] | None,
    secret_headers: list[str] | None,
    field: str,
) -> None:
    update: dict[str, Any] = {}
    if url is not None:
        update["url"] = url
    if headers is not None:
        update["headers"] = headers
    if secret_headers is not None:
        update["secret_headers"] = secret_headers
    sent = read_back(STORED).model_copy(update=update)

    with pytest.raises(ValidationError) as refused:
        kept_secrets(sent, STORED)

    (error,) = refused.value.errors(include_input=False)
    assert ".".join(str(part) for part in error["loc"]) == field
    assert "s3cret" not in str(refused.value)
    assert "k3y" not in str(refused.value)


def test_a_mask_for_a_header_made_public_is_refused() -> None:
    # Kept, the hidden value would be shown by the next read.
    sent = read_back(STORED).model_copy(update={"secret_headers": []})
    with pytest.raises(ValidationError, match="stays secret"):
        kept_secrets(sent, STORED)


def test_a_mask_in_a_header_that_never_was_secret_is_its_value() -> None:
    stored = spec(headers={"X-Stars": "***"})
    assert kept_secrets(read_back(stored), stored) == stored


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"headers": {"X-Api-Key": "k"}, "secret_headers": ["X-Api-Kye"]}, "not one of"),
        ({"secret_headers": ["X Api"]}, "not a valid token"),
    ],
)
def test_secret_headers_must_name_headers_of_the_task(fields: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        spec(**fields)


def test_secret_header_names_are_matched_in_any_case() -> None:
    assert spec(headers={"x-api-key": "k"}, secret_headers=["X-API-KEY"]).secret_headers
