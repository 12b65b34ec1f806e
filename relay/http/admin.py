"""The admin HTTP API under ``/admin/``: the suppression list as JSON and CSV.

Off unless ``http.admin_token_file`` is set; every request needs
``Authorization: Bearer <token>`` (compared in constant time). The same
operations as ``oneclick-relay suppress …``; the OpenAPI document is served at
``/admin/openapi.json``.

``GET /admin/`` is the dashboard, an HTML page for a person with a browser, which
cannot send a bearer header: without a token it answers 401 with a sign-in form
that POSTs the token to ``/admin/login``, which sets an HttpOnly, SameSite=Strict
session cookie (Secure over HTTPS) good for 12 hours and for the dashboard only;
see ``relay/http/session.py``; the page is ``relay/http/pages.py``.
"""

from __future__ import annotations

import hmac
import time
from datetime import UTC, date, datetime
from typing import Any

from aiohttp import web

from relay.config import Secret
from relay.errors import StoreUnavailable
from relay.eventlog import EventLog
from relay.http.dashboard import DashboardData, Latency, day_range, suppression_counts
from relay.http.pages import PAGE_HEADERS, render_dashboard, render_login
from relay.http.session import SESSION_COOKIE, SESSION_SECONDS, session_valid, session_value
from relay.metrics import Metrics
from relay.outbound.retry import RetryQueue
from relay.suppression.report import GMAIL_GOAL, GMAIL_LIMIT, DailyCounters
from relay.suppression.store import (
    GLOBAL,
    ProtectedEntry,
    Suppression,
    SuppressionStore,
    describe_scope,
    parse_scope,
)
from relay.suppression.store import MANUAL_REASONS as REASON_CHOICES
from relay.suppression.transfer import (
    ExportFilter,
    StatsCache,
    export_csv,
    export_row,
    import_lines,
    remove_lines,
    stats,
)

log = EventLog(__name__)

MAX_IMPORT_BYTES = 32 * 1024 * 1024
DASHBOARD = "/admin/"


def _entry(e: Suppression) -> dict[str, Any]:
    address, scope, reason, created, expires, source = export_row(e)
    return {
        "address": address,
        "scope": scope,
        "reason": reason,
        "created": created,
        "expires": expires or None,
        "source": source,
    }


def _bad(text: str, status: int = 400) -> web.Response:
    return web.json_response({"error": text}, status=status)


def _scope(query: Any) -> str | None:
    group, sender = query.get("group"), query.get("sender")
    return parse_scope(group, sender) if group or sender else None


def _html(text: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=text,
        status=status,
        content_type="text/html",
        headers=PAGE_HEADERS | (headers or {}),
    )


def _https(request: web.Request) -> bool:
    """Behind a TLS-terminating proxy too; a forged header only makes the cookie stricter."""
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def _date(query: Any, name: str) -> date | None:
    value = query.get(name)
    return date.fromisoformat(value) if value else None


class AdminApi:
    def __init__(
        self,
        store: SuppressionStore,
        retry: RetryQueue,
        token: Secret,
        counters: DailyCounters,
        *,
        metrics: Metrics,
        stats_max_age: float = 30.0,
    ) -> None:
        """``stats_max_age``: how old the dashboard's suppression counts may get."""
        self._metrics = metrics
        self._stats_cache = StatsCache(store, max_age=stats_max_age)
        self._counters = counters
        self._store = store
        self._retry = retry
        self._token = token.reveal()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/admin", self.to_dashboard),
            web.get(DASHBOARD, self.dashboard),
            web.post("/admin/login", self.login),
            web.post("/admin/logout", self.logout),
            web.get("/admin/openapi.json", self.openapi),
            web.get("/admin/suppressions", self.export),
            web.post("/admin/suppressions", self.add),
            web.post("/admin/suppressions/import", self.import_),
            web.post("/admin/suppressions/remove", self.remove_file),
            web.get("/admin/suppressions/{address}", self.show),
            web.delete("/admin/suppressions/{address}", self.remove),
            web.get("/admin/stats", self.stats),
            web.get("/admin/patterns", self.patterns),
            web.post("/admin/patterns", self.add_pattern),
            web.delete("/admin/patterns/{pattern}", self.remove_pattern),
            web.get("/admin/queue", self.queue),
            web.get("/admin/report", self.report),
        ]

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        signing_in = request.method == "POST" and request.path in ("/admin/login", "/admin/logout")
        if not request.path.startswith("/admin/") or signing_in:  # login checks the token
            response: web.StreamResponse = await handler(request)
            return response
        if not self._authorized(request):
            log.warning("admin request refused", path=request.path, client=request.remote)
            if request.path == DASHBOARD:
                return _html(
                    render_login(),
                    401,
                    {"WWW-Authenticate": 'Bearer realm="oneclick-relay admin"'},
                )
            return web.json_response(
                {"error": "missing or wrong bearer token"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="oneclick-relay admin"'},
            )
        try:
            response = await handler(request)
        except StoreUnavailable:
            return _bad("Redis unavailable, try again", 503)
        except ValueError as exc:
            return _bad(str(exc))
        return response

    def _authorized(self, request: web.Request) -> bool:
        """The bearer token, or for the dashboard page only, the session cookie."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), self._token):
            return True
        cookie = request.cookies.get(SESSION_COOKIE)
        return (
            cookie is not None
            and request.path == DASHBOARD
            and request.method in ("GET", "HEAD")
            and session_valid(self._token, cookie, time.time())
        )

    async def close(self, app: web.Application) -> None:
        """``on_cleanup``: stop a suppression scan still running for the dashboard."""
        await self._stats_cache.close()

    async def to_dashboard(self, request: web.Request) -> web.Response:
        return web.Response(status=308, headers={"Location": "admin/"})

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        supplied = form.get("token")
        if not isinstance(supplied, str) or not hmac.compare_digest(
            supplied.strip().encode(), self._token
        ):
            log.warning("admin login refused", client=request.remote)
            return _html(render_login("That is not the admin token."), 401)
        log.info("admin login", client=request.remote)
        response = _html("", 303, {"Location": "./"})
        response.set_cookie(
            SESSION_COOKIE,
            session_value(self._token, time.time()),
            max_age=SESSION_SECONDS,
            path=DASHBOARD,
            httponly=True,
            samesite="Strict",
            secure=_https(request) or None,
        )
        return response

    async def logout(self, request: web.Request) -> web.Response:
        response = _html("", 303, {"Location": "./"})
        response.del_cookie(SESSION_COOKIE, path=DASHBOARD, httponly=True, samesite="Strict")
        return response

    async def dashboard(self, request: web.Request) -> web.Response:
        days = int(request.query.get("days", "30"))
        if not 1 <= days <= 400:
            return _bad("days must be 1-400")
        today = datetime.now(UTC).date()
        rows = await self._counters.report(days, today)
        cache = self._stats_cache
        cached = await cache.get()
        note = ""
        if cache.error:
            note = f"The last scan failed ({cache.error})."
        elif cache.refreshing:
            note = "A full scan is running; reload for newer counts."
        recent = self._metrics.unsubscribe_recent
        data = DashboardData(
            days=day_range(today, days),
            rows=rows,
            latency=Latency(
                len(recent), recent.percentile(50), recent.percentile(99), recent.values()
            ),
            generated=datetime.now(UTC),
            suppressions=suppression_counts(cached) if cached else None,
            suppressions_note=note,
            cache_minutes=cache.max_age / 60,
        )
        return _html(render_dashboard(data))

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    async def show(self, request: web.Request) -> web.Response:
        address = request.match_info["address"]
        entries = await self._store.entries(address)
        pattern = await self._store.pattern_match(address)
        now = self._store.now()
        return web.json_response(
            {
                "address": address,
                "suppressed": any(e.live(now) for e in entries) or pattern is not None,
                "entries": [_entry(e) | {"live": e.live(now)} for e in entries],
                "pattern": pattern,
            }
        )

    async def add(self, request: web.Request) -> web.Response:
        body = await request.json()
        if not isinstance(body, dict) or not isinstance(body.get("address"), str):
            return _bad('expected {"address": "...", "reason": "manual", ...}')
        reason = body.get("reason", "manual")
        if reason not in REASON_CHOICES:
            return _bad(f"reason must be one of {', '.join(REASON_CHOICES)}")
        scope = parse_scope(body.get("group"), body.get("sender"))
        days = body.get("expires_days")
        if days is not None and (not isinstance(days, int | float) or days <= 0):
            return _bad("expires_days must be a positive number")
        new = await self._store.add(
            body["address"],
            scope,
            reason,
            source="admin-api",
            ttl=days * 86400 if days else None,
        )
        return web.json_response(
            {"added": new, "address": body["address"], "scope": describe_scope(scope)},
            status=201 if new else 200,
        )

    async def remove(self, request: web.Request) -> web.Response:
        address = request.match_info["address"]
        force = request.query.get("force", "").lower() in ("1", "true", "yes")
        try:
            removed = await self._store.remove(
                address,
                _scope(request.query),
                request.query.get("reason"),
                source="admin-api",
                force=force,
            )
        except ProtectedEntry as exc:
            return _bad(f"{exc} (add ?force=true; the removal is logged)", 409)
        return web.json_response({"removed": [_entry(e) for e in removed]})

    async def export(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        filters = ExportFilter(
            group=q.get("group"),
            sender=q.get("sender"),
            reason=q.get("reason"),
            since=_date(q, "since"),
            until=_date(q, "until"),
        )
        chunks = aiter(export_csv(self._store, filters))
        first = await anext(chunks)  # the first rows come from Redis: an outage is still a 503
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/csv; charset=utf-8",
                "Content-Disposition": 'attachment; filename="suppressions.csv"',
            }
        )
        await response.prepare(request)
        try:
            await response.write(first.encode())
            async for chunk in chunks:
                await response.write(chunk.encode())
        except StoreUnavailable as exc:
            # the 200 is sent: cut the connection so the client sees a truncated body,
            # never a CSV that looks complete (or a response that never ends)
            log.warning("export cut", error=exc)
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response

    async def import_(self, request: web.Request) -> web.Response:
        if request.content_length and request.content_length > MAX_IMPORT_BYTES:
            return _bad("import larger than 32 MiB: split it", 413)
        text = (await request.content.read(MAX_IMPORT_BYTES)).decode("utf-8-sig", "replace")
        reason = request.query.get("reason", "manual")
        if reason not in REASON_CHOICES:
            return _bad(f"reason must be one of {', '.join(REASON_CHOICES)}")
        report = await import_lines(
            self._store,
            text.splitlines(),
            scope=_scope(request.query) or GLOBAL,
            reason=reason,
            source="admin-import",
            dry_run=request.query.get("dry_run", "").lower() in ("1", "true", "yes"),
        )
        return web.json_response(report.as_dict())

    async def remove_file(self, request: web.Request) -> web.Response:
        """Bulk re-subscribe, as ``suppress remove --file``; complaints are never removed."""
        if request.content_length and request.content_length > MAX_IMPORT_BYTES:
            return _bad("file larger than 32 MiB: split it", 413)
        text = (await request.content.read(MAX_IMPORT_BYTES)).decode("utf-8-sig", "replace")
        report = await remove_lines(
            self._store,
            text.splitlines(),
            scope=_scope(request.query),
            source="admin-remove",
            dry_run=request.query.get("dry_run", "").lower() in ("1", "true", "yes"),
        )
        return web.json_response(report.as_dict())

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response((await stats(self._store)).as_dict())

    async def patterns(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"config": list(self._store.policy.patterns), "redis": await self._store.patterns()}
        )

    async def add_pattern(self, request: web.Request) -> web.Response:
        body = await request.json()
        pattern = body.get("pattern") if isinstance(body, dict) else None
        if not isinstance(pattern, str) or not pattern.strip() or " " in pattern.strip():
            return _bad('expected {"pattern": "mailinator.com"}')
        new = await self._store.add_pattern(pattern, source="admin-api")
        return web.json_response({"added": new}, status=201 if new else 200)

    async def remove_pattern(self, request: web.Request) -> web.Response:
        gone = await self._store.remove_pattern(request.match_info["pattern"], "admin-api")
        return web.json_response({"removed": gone}, status=200 if gone else 404)

    async def report(self, request: web.Request) -> web.Response:
        days = int(request.query.get("days", "7"))
        if not 1 <= days <= 400:
            return _bad("days must be 1-400")
        rows = await self._counters.report(days)
        group = request.query.get("group")
        return web.json_response(
            {
                "thresholds": {"goal": GMAIL_GOAL, "limit": GMAIL_LIMIT},
                "days": [r.as_dict() for r in rows if group is None or r.group == group],
            }
        )

    async def queue(self, request: web.Request) -> web.Response:
        items = await self._retry.list()
        return web.json_response(
            {
                "length": len(items),
                "items": [
                    {
                        "id": i.id,
                        "rcpt": i.rcpt,
                        "mail_from": i.mail_from,
                        "attempts": i.attempts,
                        "due": i.due,
                        "last_reply": i.reply,
                    }
                    for i in items
                ],
            }
        )


_ADDRESS = {"name": "address", "in": "path", "required": True, "schema": {"type": "string"}}
_SCOPE_PARAMS = [
    {"name": "group", "in": "query", "schema": {"type": "string"}},
    {"name": "sender", "in": "query", "schema": {"type": "string"}},
    {"name": "reason", "in": "query", "schema": {"type": "string", "enum": list(REASON_CHOICES)}},
]
_ENTRY = {
    "type": "object",
    "properties": {
        "address": {"type": "string"},
        "scope": {"type": "string", "description": "global, group:NAME or sender:ADDRESS"},
        "reason": {"type": "string"},
        "created": {"type": "string", "format": "date-time"},
        "expires": {"type": ["string", "null"], "format": "date-time"},
        "source": {"type": "string"},
    },
}
_JSON = "application/json"


def _ok(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    content = {_JSON: {"schema": schema or {"type": "object"}}}
    return {"description": description, "content": content}


def _page(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/html": {"schema": {"type": "string"}}}}


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "oneclick-relay admin API", "version": "1"},
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "session": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE},
        },
        "schemas": {"Entry": _ENTRY},
    },
    "security": [{"bearer": []}],
    "paths": {
        DASHBOARD: {
            "get": {
                "summary": "Dashboard (HTML): unsubscribes, complaint and bounce rates, "
                "suppression counts by reason, time from click to suppression",
                "security": [{"bearer": []}, {"session": []}],
                "parameters": [
                    {
                        "name": "days",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 400, "default": 30},
                    }
                ],
                "responses": {
                    "200": _page("the dashboard"),
                    "401": _page("no token or session: the sign-in form"),
                },
            }
        },
        "/admin/login": {
            "post": {
                "summary": "Sign in to the dashboard with the admin token (sets the session "
                "cookie: HttpOnly, SameSite=Strict, Secure over HTTPS, 12 hours)",
                "security": [],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/x-www-form-urlencoded": {
                            "schema": {
                                "type": "object",
                                "required": ["token"],
                                "properties": {"token": {"type": "string"}},
                            }
                        }
                    },
                },
                "responses": {
                    "303": {"description": "signed in: to the dashboard"},
                    "401": _page("wrong token: the sign-in form again"),
                },
            }
        },
        "/admin/logout": {
            "post": {
                "summary": "End the dashboard session (clears the cookie)",
                "security": [],
                "responses": {"303": {"description": "signed out: to the sign-in form"}},
            }
        },
        "/admin/suppressions": {
            "get": {
                "summary": "Export live entries as CSV (streamed)",
                "parameters": [
                    *_SCOPE_PARAMS,
                    {
                        "name": "since",
                        "in": "query",
                        "schema": {"type": "string", "format": "date"},
                    },
                    {
                        "name": "until",
                        "in": "query",
                        "schema": {"type": "string", "format": "date"},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "address,scope,reason,created,expires,source",
                        "content": {"text/csv": {"schema": {"type": "string"}}},
                    }
                },
            },
            "post": {
                "summary": "Suppress an address",
                "requestBody": {
                    "required": True,
                    "content": {
                        _JSON: {
                            "schema": {
                                "type": "object",
                                "required": ["address"],
                                "properties": {
                                    "address": {"type": "string"},
                                    "group": {"type": "string"},
                                    "sender": {"type": "string"},
                                    "reason": {"type": "string", "enum": list(REASON_CHOICES)},
                                    "expires_days": {"type": "number"},
                                },
                            }
                        }
                    },
                },
                "responses": {"201": _ok("added"), "200": _ok("already present")},
            },
        },
        "/admin/suppressions/import": {
            "post": {
                "summary": "Import a CSV (address column) or one address per line",
                "parameters": [
                    *_SCOPE_PARAMS,
                    {"name": "dry_run", "in": "query", "schema": {"type": "boolean"}},
                ],
                "requestBody": {"content": {"text/plain": {"schema": {"type": "string"}}}},
                "responses": {"200": _ok("accepted, duplicates and invalid lines")},
            }
        },
        "/admin/suppressions/remove": {
            "post": {
                "summary": "Re-subscribe many: one address per line or a CSV (address column);"
                " complaint entries are never removed in bulk",
                "parameters": [
                    *_SCOPE_PARAMS,
                    {"name": "dry_run", "in": "query", "schema": {"type": "boolean"}},
                ],
                "requestBody": {"content": {"text/plain": {"schema": {"type": "string"}}}},
                "responses": {"200": _ok("per-line outcome and totals")},
            }
        },
        "/admin/suppressions/{address}": {
            "get": {
                "summary": "Every entry for one address, and why it is (not) suppressed",
                "parameters": [_ADDRESS],
                "responses": {"200": _ok("entries")},
            },
            "delete": {
                "summary": "Re-subscribe: remove entries (complaints need force=true)",
                "parameters": [
                    _ADDRESS,
                    *_SCOPE_PARAMS,
                    {"name": "force", "in": "query", "schema": {"type": "boolean"}},
                ],
                "responses": {"200": _ok("removed"), "409": _ok("protected complaint entry")},
            },
        },
        "/admin/stats": {"get": {"summary": "Counts", "responses": {"200": _ok("stats")}}},
        "/admin/patterns": {
            "get": {"summary": "Pattern list", "responses": {"200": _ok("patterns")}},
            "post": {
                "summary": "Add a pattern (domain or address glob)",
                "requestBody": {
                    "content": {
                        _JSON: {
                            "schema": {
                                "type": "object",
                                "properties": {"pattern": {"type": "string"}},
                            }
                        }
                    }
                },
                "responses": {"201": _ok("added"), "200": _ok("already present")},
            },
        },
        "/admin/patterns/{pattern}": {
            "delete": {
                "summary": "Remove a pattern",
                "parameters": [
                    {
                        "name": "pattern",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {"200": _ok("removed"), "404": _ok("not present")},
            }
        },
        "/admin/queue": {"get": {"summary": "Retry queue", "responses": {"200": _ok("items")}}},
        "/admin/report": {
            "get": {
                "summary": "Per day and group: sent, bounces, complaints, unsubscribes, rate",
                "parameters": [
                    {"name": "days", "in": "query", "schema": {"type": "integer"}},
                    {"name": "group", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {"200": _ok("rows")},
            }
        },
    },
}
