"""The dial plan: emergency, internal, external and invalid dialled strings for FR, US, GB."""

from __future__ import annotations

import itertools
import random
import textwrap
from typing import Any

import pytest

from e911.numbers import EmergencyNumberTable, NumberClass
from sip.uri import parse_uri
from switch.dialplan import (
    REASON_FEATURE_CODE,
    REASON_NO_SUCH_EXTENSION,
    UNIVERSAL_EMERGENCY_NUMBERS,
    Destination,
    DestinationKind,
    DialPlan,
    DialPlanError,
    EmergencyNumbers,
)
from switch.settings import ConfigError, load_settings_text

EMERGENCY = DestinationKind.EMERGENCY
INTERNAL = DestinationKind.INTERNAL
EXTERNAL = DestinationKind.EXTERNAL
INVALID = DestinationKind.INVALID

FR_EXTRAS = ["114", "115", "116000", "116117", "119", "191", "196", "197"]

PLANS = {
    "FR": DialPlan("FR", "0", {"1000", "1001", "1120"}, FR_EXTRAS),
    "US": DialPlan("US", "9", {"100", "101"}, ["933"]),
    "GB": DialPlan("GB", "9", {"2000", "2001"}),
}


def fields(destination: Destination) -> dict[str, Any]:
    """The fields that are set, besides kind and dialled."""
    return {
        name: getattr(destination, name)
        for name in Destination.__slots__
        if name not in ("kind", "dialled") and getattr(destination, name) is not None
    }


def emergency(
    number: str, emergency_class: str = "emergency"
) -> tuple[DestinationKind, dict[str, Any]]:
    return EMERGENCY, {"emergency_number": number, "emergency_class": emergency_class}


def helpline(number: str) -> tuple[DestinationKind, dict[str, Any]]:
    return emergency(number, "helpline")


def carrier_test(number: str) -> tuple[DestinationKind, dict[str, Any]]:
    return emergency(number, "test")


def sos(urn: str) -> tuple[DestinationKind, dict[str, Any]]:
    emergency_class = "test" if urn.startswith("urn:service:test.") else "emergency"
    return EMERGENCY, {"service_urn": urn, "emergency_class": emergency_class}


def external(e164: str, number_type: str, region: str) -> tuple[DestinationKind, dict[str, Any]]:
    return EXTERNAL, {"e164": e164, "number_type": number_type, "region": region}


def short(number: str, cost: str, region: str) -> tuple[DestinationKind, dict[str, Any]]:
    return EXTERNAL, {
        "short_number": number,
        "number_type": "SHORT_CODE",
        "short_number_cost": cost,
        "region": region,
    }


def internal(extension: str) -> tuple[DestinationKind, dict[str, Any]]:
    return INTERNAL, {"extension": extension}


def invalid(reason: str) -> tuple[DestinationKind, dict[str, Any]]:
    return INVALID, {"reason": reason}


CASES: list[tuple[str, str, tuple[DestinationKind, dict[str, Any]]]] = [
    # ---- France, outside-line prefix 0 ---------------------------------------------
    ("FR", "1000", internal("1000")),
    ("FR", "sip:1001@pbx.example.com", internal("1001")),
    ("FR", "1120", internal("1120")),  # a configured extension, not 112 with a 0 after
    ("FR", "1121", invalid(REASON_NO_SUCH_EXTENSION)),
    ("FR", "3949", invalid(REASON_NO_SUCH_EXTENSION)),  # extension length wins
    ("FR", "0 01 23 45 67 89", external("+33123456789", "FIXED_LINE", "FR")),
    ("FR", "01 23 45 67 89", external("+33123456789", "FIXED_LINE", "FR")),  # no prefix
    ("FR", "0 06 12 34 56 78", external("+33612345678", "MOBILE", "FR")),
    ("FR", "00 44 20 7946 0000", external("+442079460000", "FIXED_LINE", "GB")),
    ("FR", "0 00 44 20 7946 0000", external("+442079460000", "FIXED_LINE", "GB")),
    ("FR", "+44 20 7946 0000", external("+442079460000", "FIXED_LINE", "GB")),
    ("FR", "tel:+33-1-23-45-67-89", external("+33123456789", "FIXED_LINE", "FR")),
    (
        "FR",
        "sip:0123456789;phone-context=+33@pbx;user=phone",
        external("+33123456789", "FIXED_LINE", "FR"),
    ),
    ("FR", "0 0899 12 34 56", external("+33899123456", "PREMIUM_RATE", "FR")),
    ("FR", "0892 12 34 56", external("+33892123456", "PREMIUM_RATE", "FR")),
    ("FR", "0 0800 12 34 56", external("+33800123456", "TOLL_FREE", "FR")),
    ("FR", "0118712", short("118712", "PREMIUM_RATE", "FR")),
    ("FR", "112", emergency("112")),
    ("FR", "0112", emergency("112")),
    ("FR", "0-112", emergency("112")),
    ("FR", "1 1 2", emergency("112")),
    ("FR", "112#", emergency("112")),
    ("FR", "15", emergency("15")),
    ("FR", "17", emergency("17")),
    ("FR", "18", emergency("18")),
    ("FR", "015", emergency("15")),
    ("FR", "017", emergency("17")),
    ("FR", "018", emergency("18")),
    ("FR", "114", helpline("114")),
    ("FR", "115", helpline("115")),
    ("FR", "119", helpline("119")),
    ("FR", "191", emergency("191")),
    ("FR", "196", emergency("196")),
    ("FR", "197", emergency("197")),
    ("FR", "116000", helpline("116000")),
    ("FR", "0116117", helpline("116117")),
    ("FR", "911", emergency("911")),  # visitors' habit: 911 everywhere
    ("FR", "sip:112@pbx;user=phone", emergency("112")),
    ("FR", "sip:+112@pbx", emergency("112")),
    ("FR", "tel:0112", emergency("112")),
    ("FR", "sip:17;phone-context=+33@pbx;user=dialstring", emergency("17")),
    ("FR", "sip:%31%31%32@pbx", emergency("112")),
    ("FR", "urn:service:sos", sos("urn:service:sos")),
    ("FR", "urn:service:sos.police", sos("urn:service:sos.police")),
    ("FR", "URN:Service:SOS.Fire", sos("urn:service:sos.fire")),
    ("FR", "urn:service:sos.ambulance", sos("urn:service:sos.ambulance")),
    ("FR", "urn:service:test.sos", sos("urn:service:test.sos")),
    ("FR", "999", invalid("not a valid number for FR")),
    ("FR", "urn:service:sosx", invalid("unsupported URN (only urn:service:sos is dialled)")),
    ("FR", "urn:service:counseling", invalid("unsupported URN (only urn:service:sos is dialled)")),
    ("FR", "*72", invalid(REASON_FEATURE_CODE)),
    ("FR", "#31#0123456789", invalid(REASON_FEATURE_CODE)),
    ("FR", "alice", invalid("not a telephone number")),
    ("FR", "sip:alice@pbx", invalid("not a telephone number")),
    ("FR", "sip:pbx.example.com", invalid("no user part to dial")),
    ("FR", "sip:@@", invalid("malformed URI")),
    ("FR", "http://example.com/112", invalid("unsupported URI scheme http:")),
    ("FR", "", invalid("nothing dialled")),
    ("FR", "0 1234", invalid("not a valid number for FR")),
    ("FR", "+999 1234", invalid("not a valid international number")),
    # ---- United States, outside-line prefix 9 --------------------------------------
    ("US", "100", internal("100")),
    ("US", "102", invalid(REASON_NO_SUCH_EXTENSION)),
    ("US", "9 1 212 555 0100", external("+12125550100", "FIXED_LINE_OR_MOBILE", "US")),
    ("US", "9 212 555 0100", external("+12125550100", "FIXED_LINE_OR_MOBILE", "US")),
    ("US", "(212) 555-0100", external("+12125550100", "FIXED_LINE_OR_MOBILE", "US")),
    ("US", "9 011 44 20 7946 0000", external("+442079460000", "FIXED_LINE", "GB")),
    ("US", "+1 212 555 0100", external("+12125550100", "FIXED_LINE_OR_MOBILE", "US")),
    ("US", "9 1 900 555 0100", external("+19005550100", "PREMIUM_RATE", "US")),
    ("US", "9 1 800 555 0100", external("+18005550100", "TOLL_FREE", "US")),
    ("US", "9988", helpline("988")),  # 988 Suicide & Crisis Lifeline: protected (EM-08)
    ("US", "411", invalid(REASON_NO_SUCH_EXTENSION)),
    ("US", "911", emergency("911")),
    ("US", "9911", emergency("911")),
    ("US", "9-911", emergency("911")),
    ("US", "911#", emergency("911")),
    ("US", "933", carrier_test("933")),
    ("US", "9933", carrier_test("933")),
    ("US", "112", emergency("112")),
    ("US", "sip:911@pbx", emergency("911")),
    ("US", "sip:+911@pbx", emergency("911")),
    ("US", "tel:911;phone-context=+1", emergency("911")),
    ("US", "sip:911;phone-context=+1@pbx;user=dialstring", emergency("911")),
    ("US", "urn:service:sos.police", sos("urn:service:sos.police")),
    ("US", "*67 212 555 0100", invalid(REASON_FEATURE_CODE)),
    # ---- United Kingdom, outside-line prefix 9 -------------------------------------
    ("GB", "2000", internal("2000")),
    ("GB", "2002", invalid(REASON_NO_SUCH_EXTENSION)),
    ("GB", "9 020 7946 0000", external("+442079460000", "FIXED_LINE", "GB")),
    ("GB", "9 0901 123 4567", external("+449011234567", "PREMIUM_RATE", "GB")),
    ("GB", "9 0800 123 4567", external("+448001234567", "TOLL_FREE", "GB")),
    ("GB", "9 00 33 1 23 45 67 89", external("+33123456789", "FIXED_LINE", "FR")),
    ("GB", "999", emergency("999")),
    ("GB", "9999", emergency("999")),
    ("GB", "112", emergency("112")),
    ("GB", "9112", emergency("112")),
    ("GB", "99", invalid("not a valid number for GB")),
]


@pytest.mark.parametrize(("country", "dialled", "expected"), CASES)
def test_classification(
    country: str, dialled: str, expected: tuple[DestinationKind, dict[str, Any]]
) -> None:
    destination = PLANS[country].classify(dialled)
    kind, expected_fields = expected
    assert (destination.kind, fields(destination)) == (kind, expected_fields)
    assert destination.dialled == dialled


def test_the_only_short_strings_classified_emergency_are_the_emergency_numbers() -> None:
    # Every digit string of 1 to 4 digits, through a French plan without extensions: the
    # emergency set must be exactly the known numbers, bare or after the prefix 0.
    plan = DialPlan("FR", "0", (), FR_EXTRAS)
    numbers = {"15", "17", "18", "112", "911", "114", "115", "119", "191", "196", "197"}
    expected = numbers | {"0" + n for n in numbers if len(n) < 4}
    found = {
        "".join(digits)
        for length in range(1, 5)
        for digits in itertools.product("0123456789", repeat=length)
        if plan.classify("".join(digits)).is_emergency
    }
    assert found == expected


def test_a_prefix_of_an_emergency_number_with_more_digits_is_not_emergency() -> None:
    # libphonenumber says 1120 "connects to" 112 in France; the dial plan matches exactly.
    plan = DialPlan("FR", "0", {"2000"})
    for dialled in ("1120", "1125", "01120", "150", "0170", "1800"):
        assert plan.classify(dialled).kind is INVALID, dialled


def test_an_emergency_number_followed_by_the_prefix_in_us_is_not_emergency() -> None:
    plan = PLANS["US"]
    assert plan.classify("9119").kind is not EMERGENCY
    assert plan.classify("99911").kind is not EMERGENCY


def test_parsed_uris_are_classified_like_their_text() -> None:
    plan = PLANS["FR"]
    for text in ("sip:0112@pbx;user=phone", "tel:+33123456789", "urn:service:sos.fire"):
        from_object = plan.classify(parse_uri(text))
        from_text = plan.classify(text)
        assert fields(from_object) == fields(from_text)
        assert from_object.kind is from_text.kind is not INVALID


def test_a_valid_e164_number_is_never_taken_for_an_emergency_number() -> None:
    # "+911" is read as 911, but only because it is no E.164 number: an extra that also
    # reads as a valid number after "+" stays that number.
    plan = DialPlan("US", None, (), ["12125550100"])
    assert plan.classify("12125550100").emergency_number == "12125550100"
    destination = plan.classify("+12125550100")
    assert destination.kind is EXTERNAL and destination.e164 == "+12125550100"


def test_without_a_prefix_short_numbers_and_full_numbers_are_dialled_directly() -> None:
    plan = DialPlan("US", None, {"1000"})
    assert fields(plan.classify("411"))["short_number"] == "411"
    assert plan.classify("2125550100").e164 == "+12125550100"
    assert plan.classify("9911").kind is not EMERGENCY  # no prefix configured
    assert plan.classify("1001").reason == REASON_NO_SUCH_EXTENSION


def test_short_numbers_need_the_outside_line_prefix_when_one_is_configured() -> None:
    destination = PLANS["FR"].classify("118712")
    assert destination.kind is INVALID
    assert destination.reason == "short numbers are dialled after the outside-line prefix 0"


def test_destination_flags() -> None:
    plan = PLANS["FR"]
    assert plan.classify("0 0899 12 34 56").is_premium
    assert plan.classify("0118712").is_premium
    assert not plan.classify("0 01 23 45 67 89").is_premium
    assert plan.classify("urn:service:test.sos").is_test_call
    assert not plan.classify("urn:service:sos").is_test_call
    assert plan.classify("112").is_emergency and not plan.classify("1000").is_emergency


@pytest.mark.parametrize(
    ("country", "prefix", "extensions", "extras", "message"),
    [
        ("FR", "0", {"112"}, [], "extension '112' is the emergency number 112"),
        ("FR", "0", {"17"}, [], "extension '17' is the emergency number 17"),
        ("FR", "0", {"0112"}, [], "outside-line prefix '0' followed by the emergency number 112"),
        ("FR", "0", {"115"}, ["115"], "extension '115' is the emergency number 115"),
        ("US", "9", {"9911"}, [], "followed by the emergency number 911"),
        ("GB", None, {"911"}, [], "extension '911' is the emergency number 911"),
        ("GB", "9", {"12a"}, [], "extension '12a' must be 1 to 15 digits"),
        ("ZZ", None, set(), [], "unknown country 'ZZ'"),
        ("FR", "0x", set(), [], "outside-line prefix '0x' must be 1 to 4 digits"),
        ("FR", None, set(), ["11 2"], "extra emergency number '11 2' must be 1 to 15 digits"),
    ],
)
def test_configurations_that_would_shadow_an_emergency_number_are_refused(
    country: str, prefix: str | None, extensions: set[str], extras: list[str], message: str
) -> None:
    with pytest.raises(DialPlanError) as caught:
        DialPlan(country, prefix, extensions, extras)
    assert message in str(caught.value)


def test_garbage_never_raises() -> None:
    plan = PLANS["FR"]
    rng = random.Random(20240601)
    alphabet = "0123456789+*#;=:@.-() %abcdefghpwurnsiptel\x00\u00e9\u0663"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        destination = plan.classify(text)
        assert isinstance(destination, Destination)
        if destination.kind is INVALID:
            assert destination.reason
    assert plan.classify("1" * 10_000).reason == "dialled string too long"
    assert plan.classify(None).kind is INVALID  # type: ignore[arg-type]
    assert plan.classify("tel:+33123456789;phone-context=+٣٣").kind is EXTERNAL


# ---- the dialplan: settings section ---------------------------------------------------


def load(text: str):  # type: ignore[no-untyped-def]
    return load_settings_text(textwrap.dedent(text), "cfg.yaml")


def load_errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(text)
    return caught.value.errors


def test_settings_section_builds_the_plan() -> None:
    settings = load(
        """\
        dialplan:
          country: fr
          outside_line_prefix: "0"
          extra_emergency_numbers: ["115", "119"]
        accounts:
          - id: acme
            devices:
              - {extension: "1000", password: pw}
              - {extension: "1001", password: pw}
        """
    )
    assert settings.dialplan.country == "FR"
    account = settings.accounts[0]
    plan = DialPlan.from_settings(settings.dialplan, [d.extension for d in account.devices])
    assert plan.classify("0115").emergency_number == "115"
    assert plan.classify("1001").extension == "1001"
    assert plan.classify("0 01 23 45 67 89").e164 == "+33123456789"


def test_settings_default_dialplan() -> None:
    settings = load("")
    assert settings.dialplan.country == "FR"
    assert settings.dialplan.outside_line_prefix is None
    assert settings.dialplan.extra_emergency_numbers == []


def test_settings_refuse_bad_dialplan_values_at_their_lines() -> None:
    errors = load_errors(
        """\
        dialplan:
          country: XX
          outside_line_prefix: 0
          extra_emergency_numbers: ["115", 119]
        """
    )
    assert errors[0].startswith("cfg.yaml:2: dialplan.country: unknown country 'XX'")
    assert errors[1] == (
        'cfg.yaml:3: dialplan.outside_line_prefix: must be a quoted string (write it as "0")'
    )
    assert errors[2] == (
        "cfg.yaml:4: dialplan.extra_emergency_numbers[1]: must be a quoted string"
        ' (write it as "119")'
    )
    assert len(errors) == 3
    errors = load_errors(
        'dialplan: {outside_line_prefix: "0a", extra_emergency_numbers: ["1", "1"]}'
    )
    assert any("outside_line_prefix: must be 1 to 4 digits" in e for e in errors)
    assert any("extra_emergency_numbers[1]: duplicate number '1'" in e for e in errors)


def test_settings_refuse_an_extension_that_an_emergency_number_shadows() -> None:
    errors = load_errors(
        """\
        dialplan:
          country: US
          outside_line_prefix: "9"
          extra_emergency_numbers: ["933"]
        accounts:
          - id: acme
            devices:
              - {extension: "100", password: pw}
              - {extension: "9911", password: pw}
              - {extension: "933", password: pw}
        """
    )
    assert errors == [
        "cfg.yaml:9: accounts[0].devices[1].extension: extension '9911' is the outside-line"
        " prefix '9' followed by the emergency number 911: it would never ring, choose another",
        "cfg.yaml:10: accounts[0].devices[2].extension: extension '933' is the emergency number"
        " 933: it would never ring, choose another",
    ]


# ---- the emergency number table (EM-01..EM-04, EM-07, EM-08) --------------------------

# Each EM-04 number of a site, with the outside-line prefix, in every URI form of EM-03.
URI_FORMS = [
    "{n}",
    "{p}{n}",
    "{p}-{n}",
    "{n}#",
    "sip:{n}@pbx",
    "sip:{p}{n}@pbx",
    "sip:{n}@pbx;user=phone",
    "sips:{n}@pbx.example.com;user=phone",
    "tel:{n}",
    "tel:{p}{n}",
    "sip:+{n}@pbx.example.com",
    "sip:{n};phone-context={ctx}@pbx;user=dialstring",
    "tel:{n};phone-context={ctx}",
]

EM_04_SITES: list[tuple[str, str, str, dict[str, str]]] = [
    ("US", "9", "+1", {"911": "emergency", "112": "emergency", "933": "test", "988": "helpline"}),
    ("CA", "9", "+1", {"911": "emergency", "112": "emergency", "933": "test"}),
    ("GB", "9", "+44", {"999": "emergency", "112": "emergency", "911": "emergency"}),
    (
        "FR",
        "0",
        "+33",
        {
            **{n: "emergency" for n in ("15", "17", "18", "112", "191", "196", "197")},
            **{n: "helpline" for n in ("114", "115", "116000", "116111", "116117", "119")},
        },
    ),
    ("DE", "0", "+49", {"110": "emergency", "112": "emergency"}),
]


@pytest.mark.parametrize(
    ("country", "prefix", "context", "number", "emergency_class", "form"),
    [
        (country, prefix, context, number, emergency_class, form)
        for country, prefix, context, numbers in EM_04_SITES
        for number, emergency_class in numbers.items()
        for form in URI_FORMS
    ],
)
def test_every_em_04_number_in_every_form_with_and_without_the_prefix(
    country: str, prefix: str, context: str, number: str, emergency_class: str, form: str
) -> None:
    # The packaged table alone: no configured extras.
    plan = DialPlan(country, prefix, {"2000", "2001"})
    dialled = form.format(n=number, p=prefix, ctx=context)
    destination = plan.classify(dialled)
    assert destination.kind is EMERGENCY, dialled
    assert destination.emergency_number == number
    assert destination.emergency_class == emergency_class
    assert destination.is_emergency
    assert destination.is_test_call is (emergency_class == "test")
    assert destination.is_helpline is (emergency_class == "helpline")


@pytest.mark.parametrize(
    ("dialled", "urn", "emergency_class"),
    [
        ("urn:service:sos", "urn:service:sos", "emergency"),
        ("urn:service:SOS.Fire", "urn:service:sos.fire", "emergency"),
        ("URN:SERVICE:SOS.MOUNTAIN", "urn:service:sos.mountain", "emergency"),
        ("urn:service:test.sos", "urn:service:test.sos", "test"),
        ("urn:service:Test.SOS.Police", "urn:service:test.sos.police", "test"),
    ],
)
def test_service_urns_carry_their_class(dialled: str, urn: str, emergency_class: str) -> None:
    destination = PLANS["US"].classify(dialled)
    assert (destination.kind, destination.service_urn) == (EMERGENCY, urn)
    assert destination.emergency_number is None
    assert destination.emergency_class == emergency_class
    assert destination.is_test_call is (emergency_class == "test")
    assert not destination.is_helpline


def test_non_emergency_destinations_have_no_emergency_class() -> None:
    plan = PLANS["FR"]
    for dialled in ("1000", "0 01 23 45 67 89", "0118712", "999", "*72"):
        destination = plan.classify(dialled)
        assert destination.emergency_class is None, dialled
        assert not (destination.is_test_call or destination.is_helpline), dialled


def test_test_and_helpline_numbers_are_country_specific() -> None:
    assert DialPlan("FR", "0").classify("0933").kind is not EMERGENCY
    assert DialPlan("GB", "9").classify("9988").kind is not EMERGENCY
    assert DialPlan("CA", "9").classify("9988").kind is not EMERGENCY  # not in EM-04 for CA
    assert DialPlan("US", "9").classify("9119").kind is not EMERGENCY


def test_a_configured_extra_keeps_the_class_the_table_gives_it() -> None:
    # Older configurations list France's helplines as extra emergency numbers.
    plan = DialPlan("FR", "0", (), ["119", "3999"])
    assert plan.classify("119").emergency_class == "helpline"
    assert plan.classify("03999").emergency_class == "emergency"


def test_extensions_cannot_shadow_test_or_helpline_numbers() -> None:
    with pytest.raises(DialPlanError, match="extension '988' is the emergency number 988"):
        DialPlan("US", "9", {"988"})
    with pytest.raises(DialPlanError, match="prefix '9' followed by the emergency number 933"):
        DialPlan("US", "9", {"9933"})
    with pytest.raises(DialPlanError, match="extension '119' is the emergency number 119"):
        DialPlan("FR", None, {"119"})
    DialPlan("GB", "9", {"988", "933"})  # neither is a number in GB


def write_numbers(path: Any, text: str) -> None:
    path.write_text(textwrap.dedent(text), encoding="utf-8")


def test_a_number_added_to_the_data_file_is_dialled_after_a_reload(tmp_path: Any) -> None:
    path = tmp_path / "numbers.yaml"
    write_numbers(path, 'FR:\n  helpline: ["3114"]\n')
    table = EmergencyNumberTable.load(path)
    plan = DialPlan("FR", "0", {"1000", "3020"}, numbers=table)
    assert plan.numbers is table
    assert plan.classify("03114").emergency_class == "helpline"
    assert plan.classify("3020").kind is INTERNAL
    assert plan.classify("03021").kind is not EMERGENCY
    # A new number, as after an ARCEP decision; no restart, a new plan swapped in.
    write_numbers(path, 'FR:\n  helpline: ["3114", "3021"]\n  emergency: ["3020"]\n')
    reloaded = plan.with_numbers(table.reload())
    destination = reloaded.classify("sip:03021@pbx;user=phone")
    assert (destination.kind, destination.emergency_number) == (EMERGENCY, "3021")
    assert destination.emergency_class == "helpline"
    # The extension 3020 is now an emergency number: it stops ringing, and is reported.
    assert reloaded.classify("3020").emergency_class == "emergency"
    assert reloaded.shadowed_extensions == {
        "3020": "extension '3020' is the emergency number 3020: it would never ring,"
        " choose another"
    }
    assert reloaded.classify("1000").kind is INTERNAL
    assert (reloaded.country, reloaded.outside_line_prefix) == ("FR", "0")
    # The old plan is unchanged.
    assert plan.classify("03021").kind is not EMERGENCY
    assert plan.shadowed_extensions == {}


def test_the_plan_keeps_its_extras_across_a_table_swap(tmp_path: Any) -> None:
    path = tmp_path / "numbers.yaml"
    write_numbers(path, "GB: {}\n")
    plan = DialPlan("GB", "9", (), ["18000"])
    swapped = plan.with_numbers(EmergencyNumberTable.load(path))
    assert swapped.classify("918000").emergency_number == "18000"
    assert swapped.classify("999").emergency_class == "emergency"


def test_from_settings_accepts_a_number_table(tmp_path: Any) -> None:
    path = tmp_path / "numbers.yaml"
    write_numbers(path, 'US:\n  helpline: ["211"]\n')
    settings = load('dialplan: {country: US, outside_line_prefix: "9"}')
    plan = DialPlan.from_settings(settings.dialplan, ["100"], EmergencyNumberTable.load(path))
    assert plan.classify("9211").emergency_class == "helpline"
    assert DialPlan.from_settings(settings.dialplan, ["100"]).classify("9211").kind is EXTERNAL


def test_emergency_numbers_keep_their_interface() -> None:
    numbers = EmergencyNumbers("us", ["12345"])
    assert numbers.country == "US" and numbers.extras == {"12345"}
    assert numbers.is_emergency("933") and numbers.is_emergency("988")
    assert numbers.classify("988") is NumberClass.HELPLINE
    assert numbers.classify("17", also_region="FR") is NumberClass.EMERGENCY
    assert numbers.classify("17") is None
    assert numbers.after_prefix("9933", "9") == "933"
    assert numbers.after_prefix("99933", "9") is None
    assert UNIVERSAL_EMERGENCY_NUMBERS == {"112", "911"}


def test_settings_refuse_an_extension_equal_to_a_helpline() -> None:
    errors = load_errors(
        """\
        dialplan: {country: US, outside_line_prefix: "9"}
        accounts:
          - id: acme
            devices:
              - {extension: "988", password: pw}
        """
    )
    assert errors == [
        "cfg.yaml:5: accounts[0].devices[0].extension: extension '988' is the emergency number"
        " 988: it would never ring, choose another"
    ]
