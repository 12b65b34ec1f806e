"""The configuration's shape: frozen dataclasses with their defaults, nothing read here.

``relay.config.loader`` builds a ``Config`` from YAML; every other package receives
these objects in its constructors and never looks at YAML or at the environment.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from relay.model import BounceKind, MessageClass, UnsubscribeScope

OnError = Literal["tempfail", "deliver"]
TlsMode = Literal["none", "starttls", "implicit"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MiB = 1024 * 1024
DEFAULT_CONFIG_ENV = "ONECLICK_RELAY_CONFIG"
DEFAULT_TOKEN_MAX_AGE_DAYS = 180


class Secret:
    """Bytes that never appear in a repr, a log line or an error."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SmtpTlsConfig:
    cert_file: Path
    key_file: Path
    mode: Literal["starttls", "implicit"] = "starttls"


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    listen: HostPort | None = HostPort("127.0.0.1", 2525)
    """None: no SMTP listener (a host that runs only the milter)."""
    allowed_networks: tuple[Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    hostname: str = field(default_factory=socket.getfqdn)
    max_message_size: int = 25 * MiB
    max_recipients: int = 1000
    timeout: float = 300.0
    """Idle timeout per client connection; it also runs while DATA is processed."""
    drain_timeout: float = 30.0
    """On SIGTERM, how long in-flight transactions may take before they are cut."""
    workers: int = 1
    """Processes sharing the listening ports (SO_REUSEPORT); the YAML default is the core count."""
    tls: SmtpTlsConfig | None = None
    auth_users_file: Path | None = None
    """SMTP AUTH users (``oneclick-relay passwd``); lets clients outside allowed_networks in."""
    max_connections: int = 500
    """Open client connections at once; more are answered ``421 4.7.0`` and closed."""
    max_connections_per_client: int = 100
    """Open connections from one address (an IPv6 client by its /64)."""
    auth_failure_delay: float = 1.0
    """Seconds before a failed AUTH is answered, so guessing is slow."""
    auth_max_failures: int = 3
    """Failed AUTH attempts on one connection before it is closed (``421 4.7.0``)."""
    auth_max_failures_per_client: int = 10
    """Failed AUTH attempts from one address in 10 minutes before it is refused at once."""


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    host: str = "127.0.0.1"
    port: int = 25
    tls: TlsMode = "none"
    username: str | None = None
    password: Secret | None = None
    timeout: float = 30.0
    connections: int = 8
    helo_name: str | None = None
    name: str | None = None
    """The retry queue's partition: relays with the same name deliver (and take over)
    each other's deferred copies. Default: host:port (for a loopback host, prefixed by
    smtp.hostname: each host's own local MTA)."""


@dataclass(frozen=True, slots=True)
class HttpConfig:
    listen: HostPort = HostPort("127.0.0.1", 8080)
    public_url: str = "https://unsubscribe.example.com"
    max_body_size: int = 8192
    admin_token: Secret | None = None
    """Bearer token of the /admin/ API; None turns the API off."""
    metrics_token: Secret | None = None
    """Bearer token /metrics asks for; None leaves /metrics open (bind it to a private address)."""
    trusted_proxies: tuple[Network, ...] = ()
    """Reverse proxies whose X-Forwarded-For names the real client."""
    max_connections: int = 1000
    """Open connections at once; more are answered ``503`` and closed."""
    max_connections_per_client: int = 50
    """Open connections from one address (trusted_proxies are exempt)."""
    header_timeout: float = 15.0
    """Seconds from connecting (or from the previous response) to a complete request head."""
    body_timeout: float = 15.0
    """Seconds a request body may take to arrive once its head is in."""


@dataclass(frozen=True, slots=True)
class RedisOnError:
    marketing: OnError = "tempfail"
    transactional: OnError = "deliver"

    def for_class(self, message_class: MessageClass) -> OnError:
        return self.marketing if message_class == "marketing" else self.transactional


@dataclass(frozen=True, slots=True)
class SentinelConfig:
    master: str
    addresses: tuple[HostPort, ...]
    db: int = 0


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str | None = None
    """None (no sentinel, not ``embedded``): a throwaway embedded server, for the demo only."""
    embedded: bool = False
    """``url: embedded``: a server run by the relay, persisting to ``data_dir`` (one host)."""
    data_dir: Path | None = None
    """The embedded server's folder: append-only file and its unix socket."""
    cluster: bool = False
    sentinel: SentinelConfig | None = None
    key_prefix: str = "ocr"
    timeout: float = 2.0
    on_error: RedisOnError = RedisOnError()


@dataclass(frozen=True, slots=True)
class TokenKey:
    id: str
    secret: Secret


@dataclass(frozen=True, slots=True)
class TokensConfig:
    keys: tuple[TokenKey, ...]
    max_age_days: int = DEFAULT_TOKEN_MAX_AGE_DAYS


@dataclass(frozen=True, slots=True)
class DkimKeyConfig:
    domain: str
    selector: str
    private_key_file: Path
    key: str = ""
    """Where this entry is in the YAML, for error messages (``dkim.keys[1]``)."""


@dataclass(frozen=True, slots=True)
class DkimConfig:
    keys: tuple[DkimKeyConfig, ...] = ()
    require_for_marketing: bool = False


@dataclass(frozen=True, slots=True)
class GroupConfig:
    name: str
    display_name: str
    list_id: str | None = None
    mailto: str | None = None
    feedback_id: str | None = None
    """This group's ``Feedback-ID`` template, instead of ``compliance.feedback_id``."""


@dataclass(frozen=True, slots=True)
class SenderRule:
    match: str
    message_class: MessageClass
    group: str | None
    unsubscribe_scope: UnsubscribeScope = "group"
    keep_app_unsubscribe: bool = False
    """Keep an HTTPS List-Unsubscribe the application set itself instead of ours."""


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    default_class: MessageClass = "transactional"
    default_group: str = "default"
    senders: tuple[SenderRule, ...] = ()
    groups: Mapping[str, GroupConfig] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SuppressionConfig:
    """Expiry per reason in days (None: never) and address patterns never to mail."""

    hard_bounce_days: float | None = 180
    soft_bounce_days: tuple[float, ...] = (7, 14, 30, 180)
    manual_days: float | None = None
    unsubscribe_days: float | None = None
    """An unsubscribe lapses after this many days (None: never; 90 mails again after 90 days)."""
    patterns: tuple[str, ...] = ()
    patterns_block_transactional: bool = False


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    url: str
    secret: Secret
    timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class NotifyConfig:
    to: str
    sender: str
    reasons: tuple[str, ...] = ("unsubscribe",)


@dataclass(frozen=True, slots=True)
class EventsConfig:
    webhook: WebhookConfig | None = None
    notify_email: NotifyConfig | None = None
    retry_first_delay: float = 5.0
    retry_max_delay: float = 600.0


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_age: float = 5 * 24 * 3600.0
    first_delay: float = 60.0
    max_delay: float = 3600.0
    poll_interval: float = 5.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True, slots=True)
class BounceThresholds:
    """Failures of each kind in a row before the address is suppressed (0: never)."""

    hard: int = 1
    soft: int = 5
    unknown: int = 3
    policy: int = 0

    def of(self, kind: BounceKind) -> int:
        return int(getattr(self, kind))


@dataclass(frozen=True, slots=True)
class BouncesConfig:
    """Return path (VERP), the inbound listener for bounces and complaints, and the rules."""

    return_path_domain: str | None = None
    """Set: mail goes upstream with ``MAIL FROM:<local_part+CODE…@return_path_domain>``."""
    local_part: str = "bounces"
    listen: HostPort | None = None
    protocol: Literal["smtp", "lmtp"] = "smtp"
    feedback_addresses: tuple[str, ...] = ()
    """More addresses the listener accepts (a feedback-loop address, an old return path)."""
    keep_days: float = 30.0
    """How long each inbound message is kept in Redis for audit (and remembered as seen)."""
    max_message_size: int = 2 * MiB
    """Bounces carry headers or a truncated original (Postfix 50 kB, Exim 100 kB)."""
    timeout: float = 60.0
    allowed_networks: tuple[Network, ...] = (
        ipaddress.ip_network("0.0.0.0/0"),
        ipaddress.ip_network("::/0"),
    )
    """Who may connect: any MTA by default (it is an MX); others get ``554 5.7.1``."""
    tls: SmtpTlsConfig | None = None
    """STARTTLS on the listener (a certificate for its MX host name)."""
    max_connections: int = 100
    max_connections_per_client: int = 10
    max_messages_per_client: int = 60
    """Messages per minute from one address; more get ``451 4.7.1`` at MAIL."""
    audit_max_bytes: int = 256 * MiB
    """Redis bytes for full audit copies of attributed messages; past it, digests only."""
    digest_bytes: int = 2048
    """What is kept of a message that was not attributed (or over budget): its head."""
    accept_unsigned: bool = False
    """Also act on a recipient a report only states (no VERP code, no unsubscribe token)."""
    thresholds: BounceThresholds = BounceThresholds()
    classify: tuple[tuple[str, str], ...] = ()
    """Overrides of the reason table: (code prefix or phrase, reason or kind), e.g.
    ("5.4.1", "user-unknown"), ("4.7", "soft"), ("not our customer", "user-unknown")."""
    suppress_suspended: bool = False
    """A disabled / suspended mailbox counts as ``hard`` (suppressed at once), not ``soft``."""

    def accepted_addresses(self) -> tuple[str, ...]:
        """Exact addresses the listener takes (``local_part+…`` is matched separately)."""
        own = (f"{self.local_part}@{self.return_path_domain}",) if self.return_path_domain else ()
        return own + self.feedback_addresses


DEFAULT_PLACEHOLDER = "%unsubscribe_url%"
DEFAULT_FOOTER_TEXT = "\r\n\r\nTo unsubscribe: %unsubscribe_url%\r\n"
DEFAULT_FOOTER_HTML = '<p style="font-size:small"><a href="%unsubscribe_url%">Unsubscribe</a></p>'
MAX_MAILTO_LOCAL_PART = 64 - 1 - 16
"""A mailto address's local part leaves room for ``+<code>`` (``relay.mail.mailto``)."""


@dataclass(frozen=True, slots=True)
class UnsubscribeConfig:
    mailto_domain: str | None = None
    """Set: marketing mail also offers ``<mailto:LOCAL+CODE@DOMAIN?subject=unsubscribe%20TOKEN>``
    (``relay.mail.mailto``: the code alone names recipient and group, as Apple Mail needs)."""
    mailto_local_part: str = "unsubscribe"
    placeholder: str = DEFAULT_PLACEHOLDER
    """Replaced in marketing mail's text parts by each recipient's https URL."""
    footer: bool = False
    """Append ``footer_text`` / ``footer_html`` when a marketing message has no placeholder."""
    footer_text: str = DEFAULT_FOOTER_TEXT
    footer_html: str = DEFAULT_FOOTER_HTML

    @property
    def mailto_address(self) -> str | None:
        return f"{self.mailto_local_part}@{self.mailto_domain}" if self.mailto_domain else None


EspProvider = Literal["ses", "sendgrid", "mailgun", "postmark"]
ESP_PROVIDERS: tuple[EspProvider, ...] = ("ses", "sendgrid", "mailgun", "postmark")


@dataclass(frozen=True, slots=True)
class EspWebhookConfig:
    """One ``esp_webhooks`` entry: how ``POST /hooks/{provider}`` is authenticated."""

    provider: EspProvider
    topic_arns: tuple[str, ...] = ()
    """ses: the SNS topics whose messages are taken (an allow-list; required)."""
    signing_cert_pem: bytes | None = None
    """ses: a pinned SNS signing certificate; None fetches ``SigningCertURL`` (HTTPS, SNS hosts)."""
    public_key: bytes | None = None
    """sendgrid: the Event Webhook's ECDSA P-256 verification key (PEM or base64 DER)."""
    signing_key: Secret | None = None
    """mailgun: the HTTP webhook signing key (HMAC-SHA256)."""
    basic_auth: Secret | None = None
    """postmark: ``user:password`` the webhook URL carries."""
    groups: Mapping[str, str] = field(default_factory=dict)
    """Provider unsubscribe group (SendGrid ASM group id) -> our group."""
    max_skew: float = 300.0
    """sendgrid, mailgun: how far a signed timestamp may be from now, in seconds."""
    key: str = "esp_webhooks"


MultiRecipient = Literal["reinject", "tempfail"]


@dataclass(frozen=True, slots=True)
class MilterConfig:
    """The milter front end (Postfix ``smtpd_milters``, Sendmail ``INPUT_MAIL_FILTER``)."""

    listen: HostPort | Path | None = None
    """``host:port``, or a Path for ``unix:/path``; None: no milter listener."""
    multi_recipient: MultiRecipient = "reinject"
    """Marketing to several recipients: re-inject the others' copies, or 452 them at RCPT."""
    timeout: float = 900.0
    """Idle time allowed between two packets from the MTA (above Postfix's smtpd_timeout:
    an SMTP session may sit idle between messages while its milter connection stays open)."""


DEFAULT_STATE_DIR = Path("/var/lib/oneclick-relay")
FEEDBACK_ID_FIELDS = ("group", "class", "domain")
"""What a ``Feedback-ID`` template may name: ``{group}``, ``{class}``, ``{domain}`` (From's)."""


@dataclass(frozen=True, slots=True)
class ComplianceConfig:
    """Complaint-feedback headers (RFC 9477 CFBL, Gmail's Feedback-ID) and the body-link lint."""

    cfbl_address: str | None = None
    """Set: marketing mail carries ``CFBL-Address: <it>; report=arf`` and a per-recipient
    ``CFBL-Feedback-ID``; the inbound listener takes mail for it (ARF reports)."""
    feedback_id: str | None = None
    """``Feedback-ID`` template for marketing mail, e.g. ``{group}:{class}:exco``."""
    require_body_link: bool = False
    """Refuse (550 5.7.0) marketing mail with neither the placeholder nor an https link."""


@dataclass(frozen=True, slots=True)
class Config:
    smtp: SmtpConfig
    upstream: UpstreamConfig
    http: HttpConfig
    redis: RedisConfig
    tokens: TokensConfig
    dkim: DkimConfig
    policy: PolicyConfig
    retry: RetryConfig = RetryConfig()
    suppression: SuppressionConfig = SuppressionConfig()
    events: EventsConfig = EventsConfig()
    bounces: BouncesConfig = BouncesConfig()
    unsubscribe: UnsubscribeConfig = UnsubscribeConfig()
    compliance: ComplianceConfig = ComplianceConfig()
    log: LogConfig = LogConfig()
    esp_webhooks: tuple[EspWebhookConfig, ...] = ()
    milter: MilterConfig = MilterConfig()

    state_dir: Path = DEFAULT_STATE_DIR
    """Local state: the unsubscribe journal (the systemd unit's StateDirectory)."""
    source: Path | None = None
    secret_files: tuple[tuple[str, Path], ...] = ()
    """(dotted key, path) of every key, secret and password file read: their modes are checked."""
