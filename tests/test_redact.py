"""The redaction helper: every credential shape is masked, text without secrets passes unchanged."""

from __future__ import annotations

import pytest

from agent.core.redact import MASK, redact, strip_userinfo


@pytest.mark.parametrize(("url", "want"), [
    ("http://user:pass@mirror:8080/x?y=1", "http://mirror:8080/x?y=1"),
    ("https://tok@mirror", "https://mirror"),
    ("http://us%40er:p@ss@mirror/", "http://mirror/"),
    ("http://mirror:8080", "http://mirror:8080"),
    ("hub", "hub"),
])
def test_strip_userinfo(url: str, want: str) -> None:
    assert strip_userinfo(url) == want


@pytest.mark.parametrize("text", [
    "GET http://user:s3cr3tpw@127.0.0.1:9/api/models/a/b failed",
    "HTTP Request: GET http://user:s3cr3tpw@mirror/x \"HTTP/1.1 200 OK\"",
    "proxy said: Authorization: Basic dXNlcjpzM2NyM3Rwdw== is not allowed",
    "{'authorization': 'Bearer s3cr3tpw-0123456789'}",
    '{"Authorization": "s3cr3tpw"}',
    "metadata (('authorization', 'Bearer s3cr3tpw-0123456789'),)",
    "token hf_s3cr3tpwAAAAAAAAAAAAAAAAAAAAAA leaked",
])
def test_redact_masks_every_shape(text: str) -> None:
    out = redact(text)
    assert "s3cr3tpw" not in out and "dXNlcjpzM2NyM3Rwdw" not in out and MASK in out
    assert redact(out) == out  # idempotent


def test_redact_named_secrets_and_plain_text() -> None:
    assert redact("value=opensesame here", ["opensesame"]) == f"value={MASK} here"
    plain = "org/x@abc at hub:http://mirror:1: the configured token was refused (HTTP 403)"
    assert redact(plain) == plain
    assert redact("mail admin@example.com") == "mail admin@example.com"
