"""The admin API over real HTTP against the real Redis, and its OpenAPI document."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Sink
from helpers import message, smtp_send

from relay.http.admin import OPENAPI
from relay.runtime.app import Relay

TOKEN = "s3cret-admin-token-0123456789"


@pytest.fixture
async def admin_relay(make_relay: Any, config_dict: dict[str, Any], tmp_path: Path) -> Relay:
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    config_dict["http"]["admin_token_file"] = str(token_file)
    config_dict["suppression"] = {"patterns": ["mailinator.com"]}
    relay: Relay = await make_relay(config_dict)
    return relay


async def call(
    relay: Relay, method: str, path: str, token: str | None = TOKEN, **kwargs: Any
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method, f"http://127.0.0.1:{relay.http_port}{path}", headers=headers, **kwargs
        ) as resp,
    ):
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.text()


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", ""])
async def test_refused_without_the_right_token(admin_relay: Relay, token: str | None) -> None:
    status, body = await call(admin_relay, "GET", "/admin/stats", token=token)
    assert status == 401
    assert "bearer" in body["error"]
    status, _ = await call(
        admin_relay, "POST", "/admin/suppressions", token=token, json={"address": "a@b.com"}
    )
    assert status == 401
    assert admin_relay.store is not None
    assert await admin_relay.store.entries("a@b.com") == []


async def test_api_is_off_without_a_token(relay: Relay) -> None:
    status, _ = await call(relay, "GET", "/admin/stats")
    assert status == 404


async def test_add_show_remove_and_protected_complaint(admin_relay: Relay, sink: Sink) -> None:
    status, body = await call(
        admin_relay,
        "POST",
        "/admin/suppressions",
        json={"address": "Bob@Example.org", "group": "newsletter", "reason": "unsubscribe"},
    )
    assert (status, body["added"], body["scope"]) == (201, True, "group:newsletter")
    status, body = await call(
        admin_relay, "POST", "/admin/suppressions", json={"address": "bob@example.org"}
    )
    assert status == 201
    status, again = await call(
        admin_relay, "POST", "/admin/suppressions", json={"address": "bob@example.org"}
    )
    assert (status, again["added"]) == (200, False)

    status, body = await call(admin_relay, "GET", "/admin/suppressions/bob@example.org")
    assert status == 200
    assert body["suppressed"] is True
    assert sorted((e["scope"], e["reason"]) for e in body["entries"]) == [
        ("global", "manual"),
        ("group:newsletter", "unsubscribe"),
    ]
    code, _ = await smtp_send(
        admin_relay.smtp_port, "x@example.com", ["bob@example.org"], message()
    )
    assert code == 250
    assert sink.handler.messages == []  # the global manual entry blocks this marketing mail

    await call(
        admin_relay,
        "POST",
        "/admin/suppressions",
        json={"address": "carl@example.org", "reason": "complaint"},
    )
    status, body = await call(admin_relay, "DELETE", "/admin/suppressions/carl@example.org")
    assert status == 409
    assert "force" in body["error"]
    status, body = await call(
        admin_relay, "DELETE", "/admin/suppressions/carl@example.org?force=true"
    )
    assert (status, [e["reason"] for e in body["removed"]]) == (200, ["complaint"])

    status, body = await call(
        admin_relay, "DELETE", "/admin/suppressions/bob@example.org?group=newsletter"
    )
    assert [e["scope"] for e in body["removed"]] == ["group:newsletter"]


async def test_bad_requests_are_400(admin_relay: Relay) -> None:
    for payload in ({}, {"address": 5}, {"address": "a@b.com", "reason": "whatever"}):
        status, body = await call(admin_relay, "POST", "/admin/suppressions", json=payload)
        assert status == 400, payload
        assert body["error"]
    status, _ = await call(admin_relay, "GET", "/admin/suppressions?since=yesterday")
    assert status == 400


async def test_import_and_export_round_trip(admin_relay: Relay) -> None:
    data = "address,reason\nA@x.com,\nnot-an-address,\nb@y.com,hard-bounce\na@x.com,\n"
    status, report = await call(
        admin_relay, "POST", "/admin/suppressions/import?group=newsletter", data=data
    )
    assert status == 200
    assert (report["accepted"], report["duplicates"]) == (2, 1)
    assert report["invalid"] == [
        {"line": 3, "text": "not-an-address", "error": "not an e-mail address"}
    ]
    status, text = await call(admin_relay, "GET", "/admin/suppressions?group=newsletter")
    assert status == 200
    rows = list(csv.DictReader(io.StringIO(text)))
    assert sorted((r["address"], r["reason"]) for r in rows) == [
        ("a@x.com", "manual"),
        ("b@y.com", "hard-bounce"),
    ]
    status, text = await call(
        admin_relay, "GET", "/admin/suppressions?since=2000-01-01&until=2000-12-31"
    )
    assert list(csv.DictReader(io.StringIO(text))) == []
    status, report = await call(
        admin_relay, "POST", "/admin/suppressions/import?group=newsletter", data=text
    )
    assert report["accepted"] == 0


async def test_patterns_and_stats(admin_relay: Relay, sink: Sink) -> None:
    status, body = await call(
        admin_relay, "POST", "/admin/patterns", json={"pattern": "trap.example"}
    )
    assert status == 201
    status, body = await call(admin_relay, "GET", "/admin/patterns")
    assert body == {"config": ["mailinator.com"], "redis": ["*@trap.example"]}
    code, text = await smtp_send(
        admin_relay.smtp_port,
        "news@example.com",
        ["x@trap.example", "y@mailinator.com", "z@example.org"],
        message(),
    )
    assert code == 250
    assert "suppressed 2" in text
    assert [m.rcpt_tos for m in sink.handler.messages] == [("z@example.org",)]
    status, body = await call(admin_relay, "GET", "/admin/suppressions/y@mailinator.com")
    assert body["pattern"] == "*@mailinator.com"
    status, body = await call(admin_relay, "DELETE", "/admin/patterns/trap.example")
    assert (status, body["removed"]) == (200, True)
    await call(admin_relay, "POST", "/admin/suppressions", json={"address": "q@example.org"})
    status, body = await call(admin_relay, "GET", "/admin/stats")
    assert body["live_entries"] == 1
    assert body["entries"] == [{"scope": "global", "reason": "manual", "count": 1}]


async def test_openapi_document_matches_the_routes(admin_relay: Relay) -> None:
    status, body = await call(admin_relay, "GET", "/admin/openapi.json")
    assert status == 200
    assert body == OPENAPI
    assert body["openapi"].startswith("3.")
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in admin_relay.web_runner.app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/admin/")
        and route.method != "HEAD"
    }
    documented = {(method, path) for path, item in body["paths"].items() for method in item}
    assert documented == served - {("get", "/admin/openapi.json")}
