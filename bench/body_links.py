"""Cost of the per-recipient body link (relay.mail.body), beside the per-message work it adds to.

    python bench/body_links.py

Prints microseconds per call, same run: the baseline is ``Message.parse`` and the DKIM
body hash of the same message (done once per message anyway).
"""

from __future__ import annotations

import binascii
import timeit

from relay.mail.body import BodyLinks
from relay.mail.dkim import body_hash
from relay.mail.message import Message

PH = "%unsubscribe_url%"
URL = "https://unsubscribe.example.com/u/k1." + "A" * 86
TEXT = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit.\r\n" * 70).encode()[:4000]


def plain(text: bytes) -> bytes:
    return (
        b"From: news@example.com\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + text + b"\r\n"
    )


def alternative(text: bytes) -> bytes:
    html = binascii.b2a_qp(b"<html><body><p>" + text + b"</p></body></html>\r\n", istext=True)
    return (
        b"From: news@example.com\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/alternative; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text + b"\r\n"
        b"--b\r\nContent-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + html + b"--b--\r\n"
    )


def us(stmt: object, number: int = 2000) -> float:
    return min(timeit.repeat(stmt, number=number, repeat=5)) / number * 1e6  # type: ignore[arg-type]


def main() -> None:
    cases = {
        "7bit, no placeholder": plain(TEXT),
        "alternative + QP html, no placeholder": alternative(TEXT),
        "alternative + QP html, placeholder in both": alternative(TEXT + f" {PH}".encode()),
    }
    print(
        f"{'message (~4 KB text), microseconds':45}"
        f" {'parse':>7} {'bh':>7} {'find':>8} {'render':>8}"
    )
    for name, data in cases.items():
        m = Message.parse(data)
        head = m.header_bytes()
        links = BodyLinks.find(head, m.body, PH)
        render = us(lambda links=links: links.render(URL)) if links else 0.0
        print(
            f"{name:45} {us(lambda data=data: Message.parse(data)):7.1f}"
            f" {us(lambda m=m: body_hash(m.body)):7.1f}"
            f" {us(lambda m=m, head=head: BodyLinks.find(head, m.body, PH)):8.1f}"
            f" {render:8.1f}"
        )


if __name__ == "__main__":
    main()
