"""Destination classes and rules of fair use: classes from libphonenumber (through the
dial plan), international calling off by default, the fraud blacklist with per-account
exceptions, operator prefix classes, and lookups whose cost does not grow with the
number of prefixes."""

from __future__ import annotations

import random
import time

import pytest

from fairuse.destinations import (
    DestinationClass,
    DestinationRules,
    DestinationTables,
    PrefixTrie,
    destination_class,
    parse_prefix,
)
from switch.dialplan import Destination, DestinationKind, DialPlan

FR = DialPlan("FR")


def rules(**kwargs: object) -> DestinationRules:
    kwargs.setdefault("home_country", "FR")
    return DestinationRules(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dialled", "expected"),
    [
        ("0612345678", DestinationClass.MOBILE),
        ("0140000000", DestinationClass.FIXED),
        ("0800123456", DestinationClass.TOLL_FREE),
        ("0899123456", DestinationClass.PREMIUM_RATE),
        ("0810123456", DestinationClass.SHARED_COST),
        ("0912345678", DestinationClass.VOIP),
        ("3000", DestinationClass.SPECIAL),  # a toll-free short number
        ("3949", DestinationClass.PREMIUM_RATE),  # a short number of premium cost
        ("+12025550123", DestinationClass.FIXED),  # NANP: fixed line or mobile
    ],
)
def test_classes_come_from_libphonenumber(dialled: str, expected: DestinationClass) -> None:
    destination = FR.classify(dialled)
    assert destination.kind is DestinationKind.EXTERNAL
    assert destination_class(destination) is expected


def test_a_premium_cost_short_number_is_premium() -> None:
    short = Destination(DestinationKind.EXTERNAL, "3617", short_number="3617",
                        number_type="SHORT_CODE", short_number_cost="PREMIUM_RATE", region="FR")
    assert destination_class(short) is DestinationClass.PREMIUM_RATE
    verdict = rules().check(short)
    assert (verdict.allowed, verdict.limit) == (False, "destination_premium")


def test_national_numbers_are_allowed_and_counted() -> None:
    verdict = rules().check(FR.classify("0612345678"))
    assert verdict.allowed and verdict.counted
    assert (verdict.country, verdict.international) == ("FR", False)
    assert verdict.limit is None and verdict.reason is None


def test_premium_is_refused_and_toll_free_is_not_counted() -> None:
    premium = rules().check(FR.classify("0899123456"))
    assert (premium.allowed, premium.limit) == (False, "destination_premium")
    assert premium.reason == "calls to premium-rate numbers are not allowed"
    toll_free = rules().check(FR.classify("0800123456"))
    assert toll_free.allowed and not toll_free.counted
    allowed = rules(refused_classes=frozenset()).check(FR.classify("0899123456"))
    assert allowed.allowed and not allowed.counted


def test_a_refused_class_has_its_own_label() -> None:
    verdict = rules(refused_classes=frozenset({DestinationClass.SHARED_COST})).check(
        FR.classify("0810123456"))
    assert (verdict.allowed, verdict.limit) == (False, "destination_shared_cost")


def test_international_calls_are_off_by_default() -> None:
    germany = FR.classify("+4915112345678")
    verdict = rules().check(germany)
    assert (verdict.allowed, verdict.limit, verdict.country) == (
        False, "destination_international", "DE")
    assert "DE" in (verdict.reason or "")
    assert rules(allowed_countries=frozenset({"DE"})).check(germany).allowed
    opened = rules(international=True).check(germany)
    assert opened.allowed and opened.international and opened.counted


def test_blacklisted_country_is_refused_even_with_international_on() -> None:
    tables = DestinationTables.build(countries=["JM"])
    jamaica = FR.classify("+18765551234")  # looks North American, is Jamaica
    verdict = rules(international=True, tables=tables).check(jamaica)
    assert (verdict.allowed, verdict.limit) == (False, "destination_blacklist_country")
    assert verdict.reason == "calls to JM are barred (fraud-prone destination)"
    excepted = rules(international=True, tables=tables,
                     exception_countries=frozenset({"JM"})).check(jamaica)
    assert excepted.allowed
    # an exception lifts the blacklist, not the international barring
    closed = rules(tables=tables, exception_countries=frozenset({"JM"})).check(jamaica)
    assert (closed.allowed, closed.limit) == (False, "destination_international")


def test_blacklisted_prefix_and_longest_match_exceptions() -> None:
    tables = DestinationTables.build(prefixes=["+4915"])
    mobile = FR.classify("+4915112345678")
    open_rules = {"international": True, "tables": tables}
    verdict = rules(**open_rules).check(mobile)
    assert (verdict.allowed, verdict.limit, verdict.matched_prefix) == (
        False, "destination_blacklist_prefix", "+4915")
    longer = PrefixTrie([("49151", True)])
    assert rules(**open_rules, exception_prefixes=longer).check(mobile).allowed
    shorter = PrefixTrie([("49", True)])
    assert not rules(**open_rules, exception_prefixes=shorter).check(mobile).allowed
    country = frozenset({"DE"})
    assert rules(**open_rules, exception_countries=country).check(mobile).allowed
    assert rules(**open_rules).check(FR.classify("+4930123456")).allowed  # other German


def test_prefix_classes_reclassify_with_the_longest_prefix() -> None:
    tables = DestinationTables.build(prefix_classes={
        "+3314": DestinationClass.SHARED_COST,
        "+331400": "premium_rate",
    })
    paris = rules(tables=tables)
    premium = paris.check(FR.classify("0140000000"))
    assert (premium.destination_class, premium.allowed, premium.matched_prefix) == (
        DestinationClass.PREMIUM_RATE, False, "+331400")
    shared = paris.check(FR.classify("0141000000"))
    assert shared.destination_class is DestinationClass.SHARED_COST
    assert shared.allowed and not shared.counted


def test_only_external_destinations_are_checked() -> None:
    with pytest.raises(ValueError, match="only external"):
        rules().check(FR.classify("112"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (881, "must be a quoted string"),
        ("881", 'must start with "\\+"'),
        ("+0881", "not starting with 0"),
        ("+12345678901234567", "1 to 15 digits"),
        ("+88a", "1 to 15 digits"),
    ],
)
def test_bad_prefixes_are_refused_with_the_reason(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_prefix(text)


def test_prefix_separators_are_ignored() -> None:
    assert parse_prefix(" +1 (876) ") == "1876"


def test_trie_agrees_with_a_linear_scan() -> None:
    generator = random.Random(5)
    prefixes = {str(generator.randint(1, 9)) + "".join(
        generator.choice("0123456789") for _ in range(generator.randint(0, 6)))
        for _ in range(2000)}
    trie = PrefixTrie((p, p) for p in prefixes)
    assert len(trie) == len(prefixes)
    for _ in range(2000):
        number = str(generator.randint(10**9, 10**12))
        candidates = [p for p in prefixes if number.startswith(p)]
        expected = max(candidates, key=len) if candidates else None
        found = trie.longest(number)
        assert (found[0] if found else None) == expected


def _lookup_time(trie: PrefixTrie, numbers: list[str]) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for number in numbers:
            trie.longest(number)
        best = min(best, time.perf_counter() - started)
    return best


def test_ten_thousand_prefixes_cost_about_what_ten_do() -> None:
    generator = random.Random(7)

    def prefix() -> str:
        return "9" + "".join(generator.choice("0123456789") for _ in range(4))

    small = PrefixTrie((prefix(), True) for _ in range(10))
    large = PrefixTrie((prefix(), True) for _ in range(10_000))
    numbers = ["9" + str(generator.randint(10**10, 10**11)) for _ in range(5000)]
    ratio = _lookup_time(large, numbers) / _lookup_time(small, numbers)
    # a linear scan would be ~1000x slower; the walk visits at most len(number) nodes
    assert ratio < 4, ratio
