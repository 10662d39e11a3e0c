"""Digest parsing, formatting and computation (sip.digest)."""

from __future__ import annotations

import hashlib
import random

import pytest

from sip.digest import (
    DigestChallenge,
    build_authorization,
    choose_challenge,
    compute_ha1,
    compute_response,
    compute_userhash,
    format_challenge,
    parse_challenge,
    parse_credentials,
    session_ha1,
    verify_response,
)

# RFC 7616 §3.9.1
RFC7616_USER = "Mufasa"
RFC7616_PASSWORD = "Circle of Life"
RFC7616_REALM = "http-auth@example.org"
RFC7616_NONCE = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
RFC7616_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"
RFC7616_OPAQUE = "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"
RFC7616_URI = "/dir/index.html"
RFC7616_EXPECTED = {
    "MD5": "8ca523f5e9506fed4657c9700eebdbec",
    "SHA-256": "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
}


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------ RFC vectors


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
def test_rfc7616_example_response(algorithm: str) -> None:
    ha1 = compute_ha1(algorithm, RFC7616_USER, RFC7616_REALM, RFC7616_PASSWORD)
    response = compute_response(
        algorithm, ha1, RFC7616_NONCE, "00000001", RFC7616_CNONCE, "auth", "GET", RFC7616_URI
    )
    assert response == RFC7616_EXPECTED[algorithm]


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
def test_rfc7616_example_authorization_header_parses_and_verifies(algorithm: str) -> None:
    header = (
        f'Digest username="Mufasa",\r\n realm="http-auth@example.org",\r\n'
        f' uri="/dir/index.html",\r\n algorithm={algorithm},\r\n'
        f' nonce="{RFC7616_NONCE}",\r\n nc=00000001,\r\n cnonce="{RFC7616_CNONCE}",\r\n'
        f' qop=auth,\r\n response="{RFC7616_EXPECTED[algorithm]}",\r\n'
        f' opaque="{RFC7616_OPAQUE}"'
    )
    credentials = parse_credentials(header)
    assert credentials is not None
    assert credentials.username == "Mufasa"
    assert credentials.algorithm == algorithm
    assert credentials.nc == "00000001"
    assert credentials.nonce_count == 1
    assert credentials.opaque == RFC7616_OPAQUE
    ha1 = compute_ha1(algorithm, RFC7616_USER, RFC7616_REALM, RFC7616_PASSWORD)
    assert verify_response(credentials, ha1, "GET")
    assert not verify_response(credentials, ha1, "POST")
    wrong_ha1 = compute_ha1(algorithm, RFC7616_USER, RFC7616_REALM, "Circle of Death")
    assert not verify_response(credentials, wrong_ha1, "GET")


def test_rfc2617_example_response() -> None:
    ha1 = compute_ha1("MD5", "Mufasa", "testrealm@host.com", "Circle Of Life")
    response = compute_response(
        "MD5",
        ha1,
        "dcd98b7102dd2f0e8b11d0f600bfb0c093",
        1,
        "0a4f113b",
        "auth",
        "GET",
        "/dir/index.html",
    )
    assert response == "6629fae49393a05397450978507c4ef1"


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
def test_build_authorization_reproduces_rfc7616_example(algorithm: str) -> None:
    challenge = parse_challenge(
        f'Digest realm="{RFC7616_REALM}", qop="auth, auth-int", algorithm={algorithm},'
        f' nonce="{RFC7616_NONCE}", opaque="{RFC7616_OPAQUE}"'
    )
    assert challenge is not None
    header = build_authorization(
        challenge, "GET", RFC7616_URI, RFC7616_USER, RFC7616_PASSWORD, cnonce=RFC7616_CNONCE
    )
    credentials = parse_credentials(header)
    assert credentials is not None
    assert credentials.response == RFC7616_EXPECTED[algorithm]
    assert credentials.qop == "auth"
    assert credentials.nc == "00000001"
    assert credentials.opaque == RFC7616_OPAQUE
    assert credentials.algorithm == algorithm


# ------------------------------------------------------------------ computation variants


def test_qop_auth_int_hashes_the_body() -> None:
    ha1 = compute_ha1("SHA-256", "alice", "example.com", "secret")
    body = b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\n"
    got = compute_response(
        "SHA-256", ha1, "n1", "0000000a", "c1", "auth-int", "INVITE", "sip:bob@x", body
    )
    ha2 = _sha256("INVITE:sip:bob@x:" + hashlib.sha256(body).hexdigest())
    assert got == _sha256(f"{ha1}:n1:0000000a:c1:auth-int:{ha2}")


def test_no_qop_is_rfc2069_style() -> None:
    ha1 = compute_ha1("MD5", "alice", "example.com", "secret")
    got = compute_response("MD5", ha1, "n1", None, None, None, "REGISTER", "sip:example.com")
    assert got == _md5(f"{ha1}:n1:" + _md5("REGISTER:sip:example.com"))


@pytest.mark.parametrize(("algorithm", "hash_hex"), [("MD5-sess", _md5), ("SHA-256-sess", _sha256)])
def test_sess_algorithms_derive_session_ha1(algorithm, hash_hex) -> None:
    base = compute_ha1(algorithm, "alice", "example.com", "secret")
    assert base == hash_hex("alice:example.com:secret")
    assert session_ha1(algorithm, base, "n1", "c1") == hash_hex(f"{base}:n1:c1")
    got = compute_response(algorithm, base, "n1", 1, "c1", "auth", "INVITE", "sip:b@x")
    sess = hash_hex(f"{base}:n1:c1")
    assert got == hash_hex(f"{sess}:n1:00000001:c1:auth:" + hash_hex("INVITE:sip:b@x"))


def test_compute_response_rejects_unknown_algorithm_and_qop() -> None:
    with pytest.raises(ValueError):
        compute_response("SHA-1", "00", "n", 1, "c", "auth", "GET", "/")
    with pytest.raises(ValueError):
        compute_response("MD5", "00", "n", 1, "c", "auth-conf", "GET", "/")


# ------------------------------------------------------------------ parsing edge cases


def test_rfc4475_regaut01_unknown_scheme_is_none() -> None:
    assert parse_credentials("NoOneKnowsThisScheme opaque-data=here") is None
    assert parse_challenge("NoOneKnowsThisScheme opaque-data=here") is None


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Digest",
        "Digest ",
        "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==",
        "Digest abc==",
        'Digest username="a", realm="r", nonce="n", uri="u"',  # no response
        'Digest username="a", realm="r", nonce="n", uri="u", response=""',
        'Digest username="a", username="b", realm="r", nonce="n", uri="u", response="1"',
        'Digest USERNAME="a", Username="b", realm="r", nonce="n", uri="u", response="1"',
        'Digest username="a, realm="r", nonce="n", uri="u", response="1"',  # unterminated
        'Digest username="a" realm="r", nonce="n", uri="u", response="1"',  # no comma
        'Digest username="a", realm="r", nonce="n", uri="u", response="1", qop=auth',
        'Digest username="a", realm="r", nonce="n", uri="u", response="1", qop=auth,'
        ' nc=1, cnonce="c"',  # nc must be 8 hex digits
        'Digest username="a", realm="r", nonce="n", uri="u", response="1", qop=auth,'
        ' nc=0000000g, cnonce="c"',
        'Digest username="a", realm="r", nonce="n", uri="u", response="1", =x',
        'Digest username="a", realm="r", nonce="n", uri="u", response="1", userhash=maybe',
        'Digest username="a\x00", realm="r", nonce="n", uri="u", response="1"',
        'Digest username="a\\',
        "Digest\x01 username=a",
    ],
)
def test_malformed_credentials_are_none(value: str) -> None:
    assert parse_credentials(value) is None


def test_non_string_and_oversized_values_are_none() -> None:
    assert parse_credentials(None) is None  # type: ignore[arg-type]
    assert parse_credentials(b"Digest username=a") is None  # type: ignore[arg-type]
    huge = 'Digest username="' + "a" * 10_000 + '", realm="r", nonce="n", uri="u", response="1"'
    assert parse_credentials(huge) is None


def test_lws_case_and_escapes_are_accepted() -> None:
    value = (
        'dIgEsT  USERNAME = "al\\"ice\\\\" ,\tRealm="example.com"\r\n ,, NONCE= "n1",'
        ' uri = "sip:example.com" , Response="ABCDEF" ,qop = auth , NC=0000000A,'
        ' cnonce="c1", Algorithm=sha-256, x-vendor=token1,'
    )
    credentials = parse_credentials(value)
    assert credentials is not None
    assert credentials.scheme == "dIgEsT"
    assert credentials.username == 'al"ice\\'
    assert credentials.realm == "example.com"
    assert credentials.nonce == "n1"
    assert credentials.uri == "sip:example.com"
    assert credentials.response == "ABCDEF"
    assert credentials.qop == "auth"
    assert credentials.nonce_count == 10
    assert credentials.algorithm == "SHA-256"
    assert credentials.params["x-vendor"] == "token1"


def test_algorithm_defaults_to_md5_and_unknown_algorithm_is_kept() -> None:
    base = 'Digest username="a", realm="r", nonce="n", uri="u", response="1"'
    assert parse_credentials(base).algorithm == "MD5"
    unknown = parse_credentials(base + ", algorithm=SHA-512-256")
    assert unknown is not None and unknown.algorithm == "SHA-512-256"
    assert not verify_response(unknown, "00", "GET")


def test_username_star_extended_value() -> None:
    value = (
        'Digest username*=UTF-8\'\'J%C3%A4s%C3%B8n%20Doe, realm="r", nonce="n",'
        ' uri="u", response="1"'
    )
    credentials = parse_credentials(value)
    assert credentials is not None
    assert credentials.username == "Jäsøn Doe"
    both = value + ', username="x"'
    assert parse_credentials(both) is None
    assert parse_credentials(value.replace("UTF-8''", "")) is None


def test_parse_challenge_fields() -> None:
    challenge = parse_challenge(
        'Digest realm="biloxi.com", qop="auth,auth-int", nonce="dcd98b", '
        'opaque="5ccc", stale=TRUE, algorithm=md5-sess, domain="sip:biloxi.com"'
    )
    assert challenge is not None
    assert challenge.realm == "biloxi.com"
    assert challenge.qop == ("auth", "auth-int")
    assert challenge.stale is True
    assert challenge.algorithm == "MD5-sess"
    assert challenge.opaque == "5ccc"
    assert challenge.domain == "sip:biloxi.com"
    assert parse_challenge('Digest realm="r"') is None  # no nonce
    assert parse_challenge('Digest nonce="n"') is None  # no realm
    assert parse_challenge('Digest realm="r", nonce="n", realm="s"') is None


def test_format_challenge_round_trip_with_special_characters() -> None:
    realm = 'odd "realm" \\ here'
    text = format_challenge(realm, "n-1", "SHA-256", opaque="op", stale=True)
    challenge = parse_challenge(text)
    assert challenge == DigestChallenge(
        scheme="Digest",
        realm=realm,
        nonce="n-1",
        algorithm="SHA-256",
        qop=("auth",),
        opaque="op",
        stale=True,
        params=challenge.params,
    )
    plain = parse_challenge(format_challenge("r", "n", "MD5", qop=None))
    assert plain is not None and plain.qop == () and plain.stale is False


def test_random_input_never_raises() -> None:
    rng = random.Random(7616)
    alphabet = 'Digest username="realm=,\\ \t\r\n\x00\x7f\xe9abc0123=,"'
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        if rng.random() < 0.5:
            text = "Digest " + text
        parse_credentials(text)
        parse_challenge(text)


# ------------------------------------------------------------------ client side


@pytest.mark.parametrize("algorithm", ["MD5", "MD5-sess", "SHA-256", "SHA-256-sess"])
def test_build_authorization_verifies_with_base_ha1(algorithm: str) -> None:
    challenge = parse_challenge(format_challenge("example.com", "abc", algorithm))
    header = build_authorization(challenge, "REGISTER", "sip:example.com", "alice", "pw", nc=3)
    credentials = parse_credentials(header)
    assert credentials is not None
    assert credentials.nc == "00000003"
    assert credentials.cnonce
    ha1 = compute_ha1(algorithm, "alice", "example.com", "pw")
    assert verify_response(credentials, ha1, "REGISTER")
    assert not verify_response(credentials, ha1, "INVITE")


def test_build_authorization_auth_int_and_rfc2069() -> None:
    ha1 = compute_ha1("MD5", "alice", "r", "pw")
    int_challenge = parse_challenge('Digest realm="r", nonce="n", qop="auth-int"')
    header = build_authorization(int_challenge, "INVITE", "sip:b@r", "alice", "pw", body=b"sdp")
    credentials = parse_credentials(header)
    assert credentials.qop == "auth-int"
    assert verify_response(credentials, ha1, "INVITE", b"sdp")
    assert not verify_response(credentials, ha1, "INVITE", b"other")

    legacy = parse_challenge('Digest realm="r", nonce="n"')
    credentials = parse_credentials(build_authorization(legacy, "INVITE", "sip:b@r", "alice", "pw"))
    assert credentials.qop is None and credentials.nc is None
    assert verify_response(credentials, ha1, "INVITE")


def test_build_authorization_rejects_unsupported_challenges() -> None:
    with pytest.raises(ValueError):
        build_authorization(
            parse_challenge('Digest realm="r", nonce="n", algorithm=SHA-1'), "GET", "/", "a", "b"
        )
    with pytest.raises(ValueError):
        build_authorization(
            parse_challenge('Digest realm="r", nonce="n", qop="auth-conf"'), "GET", "/", "a", "b"
        )


def test_verify_response_accepts_uppercase_hex() -> None:
    challenge = parse_challenge(format_challenge("r", "n", "SHA-256"))
    credentials = parse_credentials(build_authorization(challenge, "GET", "/", "a", "pw"))
    credentials.response = credentials.response.upper()
    assert verify_response(credentials, compute_ha1("SHA-256", "a", "r", "pw"), "GET")


def test_build_authorization_with_userhash() -> None:
    challenge = parse_challenge('Digest realm="r", nonce="n", algorithm=SHA-256, userhash=true')
    credentials = parse_credentials(build_authorization(challenge, "GET", "/", "alice", "pw"))
    assert credentials.userhash is True
    assert credentials.username == _sha256("alice:r")
    assert credentials.username == compute_userhash("SHA-256", "alice", "r")
    assert verify_response(credentials, compute_ha1("SHA-256", "alice", "r", "pw"), "GET")


def test_choose_challenge_prefers_sha256_and_skips_unusable() -> None:
    md5 = format_challenge("r", "n1", "MD5")
    sha = format_challenge("r", "n2", "SHA-256")
    odd = 'Digest realm="r", nonce="n3", algorithm=SHA-512-256'
    assert choose_challenge([md5, sha]).nonce == "n2"
    assert choose_challenge([odd, md5, "garbage"]).nonce == "n1"
    assert choose_challenge([odd, "NoOneKnowsThisScheme x=y"]) is None
    assert choose_challenge([]) is None
