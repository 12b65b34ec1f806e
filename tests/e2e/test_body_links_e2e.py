"""Each recipient's unsubscribe link in the body, end to end.

Real SMTP into the relay with a multipart/alternative newsletter whose HTML part is
quoted-printable → the copies the capture upstream got → each copy's link decoded from
both parts, checked against its List-Unsubscribe, its DKIM signature checked by the
independent Mail::DKIM verifier → that link POSTed over real HTTP → the real Redis.
"""

from __future__ import annotations

import email
import re
from email.message import Message as EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
from conftest import Keys, Sink
from helpers import DATA, message, perl_dkim_results, smtp_send

from relay.runtime.app import Relay

ALICE = "alice@example.net"
BOB = "bob@example.org"
NEWSLETTER = (DATA / "body" / "alternative-qp-html.eml").read_bytes()
URL = re.compile(rb"https://unsub\.example\.com/u/[\w.-]+")


def decoded_parts(data: bytes) -> dict[str, str]:
    found = {}
    for part in email.message_from_bytes(data).walk():
        assert isinstance(part, EmailMessage)
        if not part.is_multipart():
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            found[part.get_content_type()] = payload.decode("utf-8")
    return found


async def test_each_copy_carries_its_own_link_signed_and_it_unsubscribes(
    relay: Relay, sink: Sink, keys: Keys, tmp_path: Path
) -> None:
    code, text = await smtp_send(relay.smtp_port, "app@example.com", [ALICE, BOB], NEWSLETTER)
    assert code == 250, text
    dns = keys.write_dns_file(tmp_path / "dns.txt")
    links = {}
    for copy in sink.handler.messages:
        [rcpt] = copy.rcpt_tos
        header = re.search(rb"List-Unsubscribe: <([^>]+)>", copy.data)
        assert header is not None
        url = header.group(1).decode()
        parts = decoded_parts(copy.data)
        assert f"Unsubscribe: {url}\r\n" in parts["text/plain"]
        assert f'<a href="{url}">Unsubscribe</a>' in parts["text/html"]
        assert "%unsubscribe_url%" not in copy.data.decode()
        assert b"Content-Transfer-Encoding: quoted-printable" in copy.data
        [(result, h)] = perl_dkim_results(copy.data, dns)
        assert result == "pass", rcpt
        assert "list-unsubscribe" in h and "list-unsubscribe-post" in h
        links[rcpt] = url
    assert links[ALICE] != links[BOB]
    # the link in Alice's body unsubscribes Alice, and nobody else
    path = links[ALICE].removeprefix("https://unsub.example.com")
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"http://127.0.0.1:{relay.http_port}{path}",
            data="List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as resp,
    ):
        assert resp.status == 200
    assert relay.store is not None
    [entry] = await relay.store.entries(ALICE)
    assert (entry.scope, entry.reason) == ("g:newsletter", "unsubscribe")
    assert await relay.store.entries(BOB) == []
    rendered = relay.metrics.render().decode()
    assert 'oneclick_body_links_total{outcome="placeholder"} 1.0' in rendered


async def test_without_placeholder_the_body_is_shared_and_the_footer_is_opt_in(
    make_relay: Any, config_dict: dict[str, Any], sink: Sink, keys: Keys, tmp_path: Path
) -> None:
    relay = await make_relay(config_dict)
    plain = message(body="No link here.\r\n")
    code, _ = await smtp_send(relay.smtp_port, "app@example.com", [ALICE, BOB], plain)
    assert code == 250
    bodies = {m.data.partition(b"\r\n\r\n")[2] for m in sink.handler.messages}
    assert bodies == {b"No link here.\r\n"}
    assert 'oneclick_body_links_total{outcome="none"} 1.0' in relay.metrics.render().decode()
    config_dict["unsubscribe"] = {"footer": True, "footer_text": "\nLeave: %unsubscribe_url%\n"}
    footed = await make_relay(config_dict)
    before = len(sink.handler.messages)
    code, _ = await smtp_send(footed.smtp_port, "app@example.com", [ALICE], plain)
    assert code == 250
    [copy] = sink.handler.messages[before:]
    url = URL.search(copy.data)
    assert url is not None
    assert copy.data.endswith(b"No link here.\r\n\r\nLeave: " + url.group(0) + b"\r\n"), copy.data[
        -200:
    ]
    [(result, _)] = perl_dkim_results(copy.data, keys.write_dns_file(tmp_path / "dns.txt"))
    assert result == "pass"
    # transactional mail is never rewritten
    before = len(sink.handler.messages)
    receipt = message(sender="receipts@example.com", body="Total %unsubscribe_url%\r\n")
    code, _ = await smtp_send(footed.smtp_port, "app@example.com", [ALICE], receipt)
    [copy] = sink.handler.messages[before:]
    assert copy.data.endswith(b"Total %unsubscribe_url%\r\n")
