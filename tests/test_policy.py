"""relay.policy: From address → Route, first matching rule wins."""

from __future__ import annotations

from typing import Any

import pytest

from relay.config import PolicyConfig, SenderRule, parse_config
from relay.errors import PermFail
from relay.model import Route
from relay.outbound.policy import Policy


def rule(
    match: str, message_class: str = "marketing", group: str | None = None, **kw: Any
) -> SenderRule:
    if message_class == "marketing" and group is None:
        group = "default"
    return SenderRule(match=match, message_class=message_class, group=group, **kw)  # type: ignore[arg-type]


RULES = (
    rule("news@example.com", group="newsletter"),
    rule("billing@example.com", "transactional"),
    rule("*@promo.example.com", group="promotions", unsubscribe_scope="all_marketing"),
    rule("news-*@example.com", group="news-series", unsubscribe_scope="sender"),
    rule("alerts-??@example.com", group="alerts"),
    rule("*@example.com", "transactional"),  # catch-all for the domain, after the specific ones
    rule("digest@example.org", group="digest"),
    rule("digest@example.org", "transactional"),  # shadowed: first match wins
)


@pytest.fixture
def policy() -> Policy:
    return Policy(PolicyConfig(default_class="transactional", senders=RULES))


@pytest.mark.parametrize(
    ("sender", "message_class", "group", "matched_rule"),
    [
        # exact
        ("news@example.com", "marketing", "newsletter", "news@example.com"),
        ("billing@example.com", "transactional", None, "billing@example.com"),
        # case-insensitive, brackets and space tolerated
        ("NEWS@Example.COM", "marketing", "newsletter", "news@example.com"),
        ("<News@example.com>", "marketing", "newsletter", "news@example.com"),
        # *@domain
        ("deals@promo.example.com", "marketing", "promotions", "*@promo.example.com"),
        ("Deals@PROMO.example.com", "marketing", "promotions", "*@promo.example.com"),
        # *@domain is not a suffix match on the domain
        ("deals@notpromo.example.com", "transactional", None, "default"),
        ("deals@sub.promo.example.com", "transactional", None, "default"),
        # globs
        ("news-weekly@example.com", "marketing", "news-series", "news-*@example.com"),
        ("NEWS-Daily@example.com", "marketing", "news-series", "news-*@example.com"),
        ("alerts-eu@example.com", "marketing", "alerts", "alerts-??@example.com"),
        ("alerts-eur@example.com", "transactional", None, "*@example.com"),
        # first match wins: news@ is above *@example.com, *@example.com above nothing else
        ("support@example.com", "transactional", None, "*@example.com"),
        ("digest@example.org", "marketing", "digest", "digest@example.org"),
        # default class
        ("someone@example.net", "transactional", None, "default"),
        ("news@example.com.evil.test", "transactional", None, "default"),
        ("xnews@example.com", "transactional", None, "*@example.com"),
    ],
)
def test_classification_table(
    policy: Policy, sender: str, message_class: str, group: str | None, matched_rule: str
) -> None:
    route = policy.classify(sender)
    assert (route.message_class, route.group, route.rule) == (message_class, group, matched_rule)
    assert route.is_marketing == (message_class == "marketing")


def test_route_fields(policy: Policy) -> None:
    assert policy.classify("  <News-Weekly@EXAMPLE.com> ") == Route(
        message_class="marketing",
        group="news-series",
        sender="news-weekly@example.com",
        unsubscribe_scope="sender",
        keep_app_unsubscribe=False,
        rule="news-*@example.com",
    )
    promo = policy.classify("x@promo.example.com")
    assert promo.unsubscribe_scope == "all_marketing"
    news = policy.classify("news@example.com")
    assert news.unsubscribe_scope == "group"


def test_keep_app_unsubscribe_is_carried() -> None:
    policy = Policy(PolicyConfig(senders=(rule("app@example.com", keep_app_unsubscribe=True),)))
    assert policy.classify("app@example.com").keep_app_unsubscribe is True
    assert policy.classify("other@example.com").keep_app_unsubscribe is False


def test_default_transactional_has_no_group() -> None:
    route = Policy(PolicyConfig(default_class="transactional")).classify("Who@Example.NET")
    assert route == Route("transactional", None, "who@example.net")
    assert route.rule == "default"


def test_default_marketing_gets_default_group() -> None:
    policy = Policy(PolicyConfig(default_class="marketing", default_group="everything"))
    route = policy.classify("Anyone@Example.NET")
    assert route.message_class == "marketing"
    assert route.group == "everything"
    assert route.sender == "anyone@example.net"
    assert route.unsubscribe_scope == "group"


def test_sender_is_normalised_including_idn_domain() -> None:
    route = Policy(PolicyConfig()).classify("Info@Bücher.Example")
    assert route.sender == "info@xn--bcher-kva.example"


def test_exact_rule_with_idn_domain_matches_both_spellings() -> None:
    policy = Policy(PolicyConfig(senders=(rule("news@bücher.example", group="b"),)))
    assert policy.classify("news@BÜCHER.example").group == "b"
    assert policy.classify("news@xn--bcher-kva.example").group == "b"


def test_domain_rule_with_idn_domain_matches() -> None:
    """``*@domain`` is part of the contract; an IDN domain must not silently never match."""
    policy = Policy(PolicyConfig(senders=(rule("*@bücher.example", group="b"),)))
    assert policy.classify("news@bücher.example").message_class == "marketing"
    assert policy.classify("news@xn--bcher-kva.example").message_class == "marketing"


def test_rules_from_yaml_config_are_case_insensitive(tmp_path: Any) -> None:
    secret = tmp_path / "k.key"
    secret.write_bytes(b"s" * 40)
    config = parse_config(
        {
            "http": {"public_url": "https://u.example.com"},
            "tokens": {"keys": [{"id": "k1", "secret_file": str(secret)}]},
            "policy": {
                "default_class": "marketing",
                "default_group": "misc",
                "senders": [
                    {"match": "News@EXAMPLE.com", "class": "marketing", "group": "newsletter"},
                    {"match": "Offers-*@Example.COM", "class": "marketing"},
                    {"match": "*@Example.COM", "class": "transactional"},
                ],
            },
        }
    )
    policy = Policy(config.policy)
    assert policy.classify("news@example.com").group == "newsletter"
    assert policy.classify("OFFERS-x@example.com").group == "misc"
    assert policy.classify("x@example.com").message_class == "transactional"
    assert policy.classify("x@example.org") == Route("marketing", "misc", "x@example.org")


def test_describe_lists_rules_in_order_then_default(policy: Policy) -> None:
    lines = [" ".join(line.split()) for line in policy.describe()]
    assert lines[0] == "news@example.com -> marketing group=newsletter scope=group"
    assert lines[1] == "billing@example.com -> transactional"
    assert lines[3] == "news-*@example.com -> marketing group=news-series scope=sender"
    assert lines[-1] == "(any other sender) -> transactional"
    assert len(lines) == len(RULES) + 1


@pytest.mark.parametrize(
    "sender",
    [
        "news@example.com.",
        '"news"@example.com',
        '"News"@Example.COM.',
        '"n\\ews"@example.com',
    ],
)
def test_spellings_of_a_marketing_sender_are_classified_marketing(sender: str) -> None:
    """A trailing root dot or needless quotes once made marketing mail transactional."""
    policy = Policy(PolicyConfig(senders=(rule("news@example.com", group="newsletter"),)))
    route = policy.classify(sender)
    assert (route.message_class, route.group) == ("marketing", "newsletter")
    assert route.sender == "news@example.com"


def test_glob_rules_see_the_canonical_sender() -> None:
    policy = Policy(PolicyConfig(senders=(rule("*@promo.example.com", group="p"),)))
    assert policy.classify("deals@promo.example.com.").message_class == "marketing"
    assert policy.classify('"deals"@PROMO.example.com').message_class == "marketing"


def test_sharp_s_domain_is_not_the_ss_domain() -> None:
    policy = Policy(PolicyConfig(senders=(rule("news@straße.de", group="s"),)))
    assert policy.classify("news@straße.de").group == "s"
    assert policy.classify("news@xn--strae-oqa.de").group == "s"
    assert policy.classify("news@strasse.de").message_class == "transactional"


@pytest.mark.parametrize("sender", ["news@exa..mple.com", "news@xn--zz.example", "news@☃.example"])
def test_a_from_without_canonical_form_is_refused(sender: str) -> None:
    with pytest.raises(PermFail) as info:
        Policy(PolicyConfig()).classify(sender)
    assert (info.value.reply.code, info.value.reply.enhanced) == (550, "5.1.7")
    assert "From address cannot be normalised" in info.value.reply.text
