"""The emergency number table (EM-04): packaged data, operator files, extras, reload,
file:line errors, and recognition of emergency targets (EM-06)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from phonenumbers import shortnumberinfo

from e911.numbers import (
    EU_MEMBER_STATES,
    EXTRAS_SOURCE,
    UNIVERSAL_EMERGENCY_NUMBERS,
    EmergencyNumberTable,
    NumberClass,
    NumberTableError,
    classify_target,
    default_table,
    is_emergency_target,
)
from switch.dialplan import DialPlan

E = NumberClass.EMERGENCY
T = NumberClass.TEST
H = NumberClass.HELPLINE

# The EM-04 table, row by row.
EM_04: dict[str, dict[NumberClass, set[str]]] = {
    "US": {E: {"911"}, T: {"933"}, H: {"988"}},
    "CA": {E: {"911"}, T: {"933"}, H: set()},
    "GB": {E: {"999", "112"}, T: set(), H: set()},
    "FR": {
        E: {"15", "17", "18", "112", "191", "196", "197"},
        T: set(),
        H: {"114", "115", "116000", "116111", "116117", "119"},
    },
}


def write(tmp_path: Path, text: str, name: str = "numbers.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_problems(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(NumberTableError) as caught:
        EmergencyNumberTable.load(path)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


# ---- the packaged table ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("country", "number", "expected"),
    [
        (country, number, number_class)
        for country, row in EM_04.items()
        for number_class, numbers in row.items()
        for number in sorted(numbers)
    ],
)
def test_every_row_of_em_04_classifies(
    country: str, number: str, expected: NumberClass
) -> None:
    assert default_table().classify(number, country) is expected


@pytest.mark.parametrize("country", sorted(EM_04))
def test_the_listed_numbers_of_em_04_countries_are_exactly_the_table(country: str) -> None:
    listed = default_table().entries[country]
    expected = {n: c for c, numbers in EM_04[country].items() for n in numbers}
    assert dict(listed) == expected


def test_numbers_by_class_include_universal_and_short_number_data() -> None:
    table = default_table()
    fr = table.numbers("FR")
    assert fr[E] == {"15", "17", "18", "112", "191", "196", "197", "911"}
    assert fr[H] == EM_04["FR"][H] and fr[T] == set()
    us = table.numbers("us")
    assert us == {E: {"911", "112"}, T: {"933"}, H: {"988"}}
    # Japan is not listed: libphonenumber's emergency numbers plus 112 and 911.
    jp = table.numbers("JP")
    assert {"110", "119", "112", "911"} <= jp[E] and not jp[T] and not jp[H]
    assert all(shortnumberinfo.is_emergency_number(n, "JP") for n in jp[E] - {"911", "112"})


def test_every_eu_member_state_lists_112_and_its_national_numbers_agree_with_short_data() -> None:
    table = default_table()
    assert len(EU_MEMBER_STATES) == 27
    for country in sorted(EU_MEMBER_STATES):
        listed = table.entries[country]
        assert listed.get("112") is E, country
        if country == "FR":
            continue  # the ARCEP list goes beyond libphonenumber's data
        for number, number_class in listed.items():
            assert number_class is E
            assert shortnumberinfo.is_emergency_number(number, country), (country, number)
    assert table.classify("110", "DE") is E


def test_112_and_911_are_emergency_numbers_in_every_country() -> None:
    table = default_table()
    for country in ("US", "CA", "GB", "FR", "DE", "JP", "AU", "BR", "ZA", "XX", ""):
        for number in UNIVERSAL_EMERGENCY_NUMBERS:
            assert table.classify(number, country) is E, (country, number)


def test_classification_is_exact_and_country_specific() -> None:
    table = default_table()
    assert table.classify("1120", "FR") is None
    assert table.classify("9911", "US") is None  # prefixes are the dial plan's business
    assert table.classify("933", "FR") is None
    assert table.classify("988", "CA") is None
    assert table.classify("999", "US") is None
    assert table.classify("15", "GB") is None
    assert table.classify("119", "JP") is E  # libphonenumber: fire and ambulance there
    assert table.classify("119", "FR") is H  # the listed class wins over the data
    for bad in ("", "11a", "+112", "1" * 16, None, 112):
        assert table.classify(bad, "FR") is None  # type: ignore[arg-type]


def test_default_table_is_loaded_once() -> None:
    assert default_table() is default_table()
    assert default_table().path is None and default_table().extras is None
    assert default_table().sources[0].endswith("numbers.yaml")


# ---- operator files, extras and reload ------------------------------------------------


def test_operator_file_adds_and_reclassifies_numbers(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        FR:
          helpline: ["3114"]      # national suicide prevention line
          emergency: ["115"]      # an operator's choice: a PSAP call here
        DE:
          helpline: ["116117"]
        """,
    )
    table = EmergencyNumberTable.load(path)
    assert table.classify("3114", "FR") is H
    assert table.classify("115", "FR") is E
    assert table.classify("119", "FR") is H  # the packaged entries stay
    assert table.classify("116117", "DE") is H
    assert table.classify("3114", "DE") is None
    assert table.sources == (default_table().sources[0], str(path))


def test_extras_are_merged_last(tmp_path: Path) -> None:
    path = write(tmp_path, 'US:\n  test: ["9334"]\n')
    table = EmergencyNumberTable.load(
        path, extras={"US": {"helpline": ["9334", "211"]}, "GB": {"emergency": ["18000"]}}
    )
    assert table.classify("9334", "US") is H
    assert table.classify("211", "US") is H
    assert table.classify("18000", "GB") is E
    assert table.sources[-1] == EXTRAS_SOURCE


def test_a_number_added_to_the_file_classifies_after_a_reload(tmp_path: Path) -> None:
    path = write(tmp_path, 'FR:\n  helpline: ["3114"]\n')
    table = EmergencyNumberTable.load(path, extras={"FR": {"test": ["3999"]}})
    assert table.classify("3020", "FR") is None
    # As after an ARCEP decision: the operator adds a number, then reloads.
    write(tmp_path, 'FR:\n  helpline: ["3114", "3020"]\n')
    reloaded = table.reload()
    assert reloaded.classify("3020", "FR") is H
    assert reloaded.classify("3114", "FR") is H
    assert reloaded.classify("3999", "FR") is T  # the same extras again
    assert reloaded.path == path
    assert table.classify("3020", "FR") is None  # the old table is unchanged


def test_a_bad_file_on_reload_raises_and_leaves_the_old_table_usable(tmp_path: Path) -> None:
    path = write(tmp_path, 'FR:\n  helpline: ["3114"]\n')
    table = EmergencyNumberTable.load(path)
    write(tmp_path, 'FR:\n  helpline: ["3114", "31x4"]\n')
    with pytest.raises(NumberTableError) as caught:
        table.reload()
    assert caught.value.problems == [
        f"{path}:2: FR.helpline[1]: '31x4' is not a dial string of 1 to 15 digits"
    ]
    assert table.classify("3114", "FR") is H
    path.unlink()
    with pytest.raises(NumberTableError) as caught:
        table.reload()
    assert str(caught.value).startswith(f"{path}:1: (file): cannot read:")


# ---- bad files ------------------------------------------------------------------------


def test_bad_yaml_is_reported_at_its_line(tmp_path: Path) -> None:
    problems = load_problems(tmp_path, 'FR:\n  helpline: ["114"\n  test: []\n')
    assert len(problems) == 1
    assert problems[0].startswith(f"{tmp_path / 'numbers.yaml'}:3: (yaml): ")


def test_every_problem_of_a_file_is_reported_with_file_line_and_key(tmp_path: Path) -> None:
    problems = load_problems(
        tmp_path,
        """\
        # an operator file with one problem a line
        US:
          emergency: ["911", 933, "9-11"]
          helplines: ["988"]
          test: ["1234567890123456", "933", "933"]
        uk:
          emergency: ["999"]
        fr:
          emergency: ["17"]
        ZZ: {}
        CA:
          helpline: ["911"]
          emergency: "911"
        GB: ["999"]
        DE:
          emergency:
            - 0110
        """,
    )
    name = str(tmp_path / "numbers.yaml")
    assert problems == [
        f'{name}:3: US.emergency[1]: must be a quoted string (write it as "933")',
        f"{name}:3: US.emergency[2]: '9-11' is not a dial string of 1 to 15 digits",
        f"{name}:4: US.helplines: unknown key 'helplines' (expected emergency, test, helpline)",
        f"{name}:5: US.test[0]: '1234567890123456' is not a dial string of 1 to 15 digits",
        f"{name}:5: US.test[2]: '933' is already listed for US at line 5",
        f'{name}:6: uk: unknown country code: the United Kingdom is "GB"',
        f"{name}:8: fr: country codes are upper case: write 'FR'",
        f"{name}:10: ZZ: unknown country code (ISO 3166 alpha-2 expected)",
        f"{name}:12: CA.helpline[0]: '911' is an emergency number in every country:"
        " it cannot be listed as helpline",
        f'{name}:13: CA.emergency: must be a list of quoted numbers, e.g. ["112"]',
        f"{name}:14: GB: must be a mapping of emergency, test and helpline lists",
        f'{name}:17: DE.emergency[0]: must be a quoted string (write it as "0110")',
    ]


def test_a_number_in_two_lists_of_one_country_is_refused(tmp_path: Path) -> None:
    problems = load_problems(tmp_path, 'FR:\n  emergency: ["3114"]\n  helpline: ["3114"]\n')
    assert problems == [
        f"{tmp_path / 'numbers.yaml'}:3: FR.helpline[0]: '3114' is already listed for FR"
        " at line 2"
    ]


def test_duplicate_keys_and_wrong_roots_are_refused(tmp_path: Path) -> None:
    name = str(tmp_path / "numbers.yaml")
    problems = load_problems(tmp_path, 'FR:\n  test: []\nFR:\n  helpline: ["3114"]\n')
    assert problems == [f'{name}:3: (yaml): duplicate key "FR"']
    assert load_problems(tmp_path, '- "112"\n') == [
        f"{name}:1: (root): must be a mapping of country codes to number lists"
    ]
    assert load_problems(tmp_path, "12: {}\n") == [
        f'{name}:1: 12: not a country code (ISO 3166 alpha-2 expected, e.g. "FR")'
    ]


def test_empty_files_and_empty_lists_are_fine(tmp_path: Path) -> None:
    assert EmergencyNumberTable.load(write(tmp_path, "# nothing yet\n")).classify(
        "17", "FR"
    ) is E
    table = EmergencyNumberTable.load(write(tmp_path, "BE:\nNL:\n  test:\n  helpline: []\n"))
    assert table.classify("101", "BE") is E


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "numbers.yaml"
    path.write_bytes(b'FR:\n  helpline: ["\xff"]\n')
    with pytest.raises(NumberTableError) as caught:
        EmergencyNumberTable.load(path)
    assert str(caught.value).startswith(f"{path}:1: (file): not UTF-8 text")


def test_bad_extras_are_refused_with_their_key() -> None:
    with pytest.raises(NumberTableError) as caught:
        EmergencyNumberTable.load(
            extras={"FR": {"helpline": ["3114", "31 14"], "tests": ["1"]}, "XX": {}}
        )
    assert caught.value.problems == [
        f"{EXTRAS_SOURCE}: FR.helpline[1]: '31 14' is not a dial string of 1 to 15 digits",
        f"{EXTRAS_SOURCE}: FR.tests: unknown key 'tests' (expected emergency, test, helpline)",
        f"{EXTRAS_SOURCE}: XX: unknown country code (ISO 3166 alpha-2 expected)",
    ]
    with pytest.raises(NumberTableError):
        EmergencyNumberTable.load(extras=["112"])  # type: ignore[arg-type]


# ---- emergency targets (EM-06) --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "country", "prefix", "expected"),
    [
        ("911", "US", "9", E),
        ("9911", "US", "9", E),
        ("9-911", "US", "9", E),
        ("112", "US", "9", E),
        ("933", "US", "9", T),
        ("9933", "US", "9", T),
        ("988", "US", "9", H),
        ("urn:service:sos", "US", "9", E),
        ("URN:Service:SOS.Fire", "US", "9", E),
        ("urn:service:test.sos.police", "US", "9", T),
        ("sip:112@x", "US", "9", E),
        ("sip:+911@pbx.example.com", "US", None, E),
        ("sip:911@pbx;user=phone", "US", None, E),
        ("tel:911", "US", None, E),
        ("sip:911;phone-context=+1@pbx;user=dialstring", "US", None, E),
        ("sip:17;phone-context=+33@pbx;user=dialstring", "US", None, E),
        ("sip:%39%31%31@pbx", "US", None, E),
        ("911#", "US", None, E),
        ("0-15", "FR", "0", E),
        ("0119", "FR", "0", H),
        ("116000", "FR", "0", H),
        ("sip:0112@pbx", "FR", "0", E),
        ("9999", "GB", "9", E),
        ("0110", "DE", "0", E),
        # Not emergency targets:
        ("9911", "US", None, None),
        ("1120", "FR", "0", None),
        ("933", "FR", "0", None),
        ("2125550100", "US", "9", None),
        ("sip:alice@pbx", "US", "9", None),
        ("urn:service:counseling", "US", "9", None),
        ("urn:service:sosx", "US", "9", None),
        ("http://example.com/911", "US", "9", None),
        ("sip:@@", "US", "9", None),
        ("", "US", "9", None),
    ],
)
def test_emergency_targets(
    text: str, country: str, prefix: str | None, expected: NumberClass | None
) -> None:
    assert classify_target(text, country, prefix) is expected
    assert is_emergency_target(text, country, prefix) is (expected is not None)


def test_targets_agree_with_the_dial_plan() -> None:
    plans = {"US": DialPlan("US", "9"), "FR": DialPlan("FR", "0"), "GB": DialPlan("GB", "9")}
    texts = [
        "911", "9911", "933", "9933", "988", "9988", "112", "0112", "15", "015", "119",
        "116111", "0116117", "999", "9999", "1234", "90123456789", "tel:+33-1-23-45-67-89",
        "sip:+112@x", "tel:112", "urn:service:sos.ambulance", "urn:service:test.sos",
    ]
    for country, plan in plans.items():
        for text in texts:
            destination = plan.classify(text)
            found = classify_target(text, country, plan.outside_line_prefix)
            assert destination.is_emergency is (found is not None), (country, text)
            assert destination.emergency_class == (found.value if found else None)


def test_targets_use_the_given_table_and_extra_numbers(tmp_path: Path) -> None:
    table = EmergencyNumberTable.load(write(tmp_path, 'FR:\n  helpline: ["3114"]\n'))
    assert classify_target("03114", "FR", "0", table=table) is H
    assert classify_target("03114", "FR", "0") is None
    assert classify_target("3999", "FR", None, extra_numbers=["3999"]) is E
    assert not is_emergency_target(None, "FR", None)  # type: ignore[arg-type]
