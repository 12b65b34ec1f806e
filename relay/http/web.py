"""The HTTP side: one-click unsubscribe (RFC 8058), its confirmation page, health, metrics.

``POST /u/{token}`` is what Gmail, Yahoo and Apple Mail send when a person presses
"Unsubscribe": it takes effect at once and answers 200, with no redirect, cookie
or login. ``GET /u/{token}`` only shows a page with a button that POSTs: link
scanners and prefetchers follow GETs, so a GET never changes anything.
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import parse_qs

from aiohttp import web

from relay.config import Network, Secret
from relay.errors import StoreUnavailable
from relay.eventlog import EventLog
from relay.http.admin import AdminApi
from relay.http.hooks import EspHooks
from relay.http.pages import (
    PAGE_HEADERS,
    render_refused,
    render_unsubscribe_confirm,
    render_unsubscribed,
)
from relay.mail.tokens import ExpiredToken, TokenError
from relay.metrics import Metrics
from relay.suppression.store import SuppressionStore
from relay.suppression.unsubscribe import JournalReplayer, Unsubscriber

log = EventLog(__name__)

ONE_CLICK_FIELD = "List-Unsubscribe"
ONE_CLICK_VALUE = "One-Click"
MAX_HEADERS = 64
MAX_LINE = 4096


def _page(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", headers=PAGE_HEADERS)


def _plain(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text + "\n", status=status, headers=PAGE_HEADERS)


class WebApp:
    def __init__(
        self,
        unsubscriber: Unsubscriber,
        store: SuppressionStore,
        metrics: Metrics,
        trusted_proxies: tuple[Network, ...] = (),
        metrics_token: Secret | None = None,
        *,
        journal: JournalReplayer | None = None,
    ) -> None:
        """``journal``: its pending requests are shown by ``/healthz``."""
        self._journal = journal
        self.unsubscriber = unsubscriber
        self._store = store
        self._metrics = metrics
        self._trusted = trusted_proxies
        self._metrics_token = metrics_token.reveal() if metrics_token is not None else None

    def build(
        self, max_body_size: int, admin: AdminApi | None = None, hooks: EspHooks | None = None
    ) -> web.Application:
        app = web.Application(
            client_max_size=max_body_size,
            middlewares=[admin.middleware] if admin is not None else [],
        )
        if admin is not None:
            app.add_routes(admin.routes())
            app.on_cleanup.append(admin.close)
        if hooks is not None:
            app.add_routes(hooks.routes())
            app.on_cleanup.append(hooks.close)
        app.add_routes(
            [
                web.post("/u/{token}", self.post_unsubscribe),
                web.get("/u/{token}", self.get_unsubscribe),
                web.get("/healthz", self.healthz),
                web.get("/metrics", self.metrics),
            ]
        )
        return app

    async def get_unsubscribe(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        try:
            claims = self.unsubscriber.inspect(token)
        except TokenError as exc:
            return self._refuse(exc, html_page=True)
        return _page(
            render_unsubscribe_confirm(
                self.unsubscriber.list_name(claims),
                _mask(claims.recipient),
                ONE_CLICK_FIELD,
                ONE_CLICK_VALUE,
            )
        )

    async def post_unsubscribe(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        try:
            form = await _read_form(request)
        except ValueError as exc:
            self._metrics.http_rejected.labels("400").inc()
            return _plain(f"Bad request: {exc}", 400)
        via_page = form.get("via") == "page"
        if form and form.get(ONE_CLICK_FIELD) != ONE_CLICK_VALUE:
            self._metrics.http_rejected.labels("400").inc()
            return _plain("Bad request: expected List-Unsubscribe=One-Click", 400)
        channel = "page" if via_page else ("post-empty" if not form else "post")
        try:
            done = await self.unsubscriber.unsubscribe(
                token,
                channel,
                user_agent=request.headers.get("User-Agent", ""),
                client=self.client_address(request),
            )
        except TokenError as exc:
            return self._refuse(exc, html_page=via_page)
        except StoreUnavailable as exc:
            # neither Redis nor the local journal could keep it: the only 503
            self._metrics.http_rejected.labels("503").inc()
            log.error("unsubscribe not kept", reason=str(exc), status=503)
            return _plain("Service temporarily unavailable, please try again later.", 503)
        name = self.unsubscriber.list_name(done.claims)
        if via_page:
            return _page(render_unsubscribed(name, _mask(done.claims.recipient)))
        return _plain(f"Unsubscribed from {name}.")

    def client_address(self, request: web.Request) -> str:
        """The peer, or behind a trusted proxy the last untrusted X-Forwarded-For hop."""
        remote = request.remote or ""
        if not self._trusted or not _in(remote, self._trusted):
            return remote
        hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",")]
        for hop in reversed([h for h in hops if h]):
            if not _in(hop, self._trusted):
                return hop
        return remote

    def _refuse(self, exc: TokenError, *, html_page: bool) -> web.Response:
        self._metrics.http_rejected.labels(str(exc.status)).inc()
        log.info("unsubscribe refused", status=exc.status, reason=exc)
        text = (
            "This unsubscribe link has expired."
            if isinstance(exc, ExpiredToken)
            else "This unsubscribe link is not valid."
        )
        if html_page:
            return _page(render_refused(text), exc.status)
        return _plain(text, exc.status)

    async def healthz(self, request: web.Request) -> web.Response:
        """Redis, and the unsubscribes waiting in the local journal (0 when all are in Redis)."""
        redis_ok = await self._store.ping()
        body: dict[str, object] = {
            "status": "ok" if redis_ok else "degraded",
            "redis": "ok" if redis_ok else "unreachable",
        }
        if self._journal is not None:
            pending = await self._journal.pending()
            body["journal_pending"] = pending
            if pending and redis_ok:
                body["status"] = "replaying"
        return web.json_response(body, status=200 if redis_ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        """The Prometheus text; with ``http.metrics_token_file`` only for its bearer token."""
        if self._metrics_token is not None:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self._metrics_token
            ):
                self._metrics.http_rejected.labels("401").inc()
                log.warning("metrics request refused", client=request.remote)
                return web.Response(
                    text="missing or wrong bearer token\n",
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="oneclick-relay metrics"'},
                )
        return web.Response(body=self._metrics.render(), content_type="text/plain", charset="utf-8")


async def _read_form(request: web.Request) -> dict[str, str]:
    """The POST fields, urlencoded or multipart; an empty body gives an empty dict."""
    if request.content_type == "multipart/form-data":
        form = await request.post()
        return {k: v for k, v in form.items() if isinstance(v, str)}
    body = await request.read()
    if not body.strip():
        return {}
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("body is not ASCII form data") from None
    fields = parse_qs(text.strip(), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}


def _in(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _mask(address: str) -> str:
    """``j***@example.com``: enough for a person to recognise, not to harvest."""
    local, _, domain = address.rpartition("@")
    return f"{local[:1]}***@{domain}" if local else address
