"""Switch-side digest policy: nonces, replay protection, verification and bans (switch.auth)."""

from __future__ import annotations

import hashlib

import pytest

import sip.digest
from sip.digest import (
    DigestCredentials,
    build_authorization,
    compute_ha1,
    parse_challenge,
    parse_credentials,
)
from switch.auth import (
    AuthOutcome,
    DigestAuthenticator,
    FailureBan,
    NonceCountTracker,
    NonceIssuer,
    NonceStatus,
    NonceUse,
    StoredCredentials,
)

SECRET = b"cluster-shared-secret-0123456789"
REALM = "pbx.example.com"
LIFETIME = 300.0
T0 = 1_700_000_000.0
REGISTER_URI = "sip:pbx.example.com"


# ------------------------------------------------------------------ nonces


def test_nonce_valid_then_stale_after_lifetime() -> None:
    issuer = NonceIssuer(SECRET, LIFETIME)
    nonce = issuer.issue(T0, REALM)
    assert len(nonce) == 43
    assert issuer.check(nonce, T0, REALM) is NonceStatus.VALID
    assert issuer.check(nonce, T0 + LIFETIME - 1, REALM) is NonceStatus.VALID
    assert issuer.check(nonce, T0 + LIFETIME + 1, REALM) is NonceStatus.STALE
    assert issuer.issued_at(nonce, REALM) == pytest.approx(T0, abs=0.001)


def test_nonce_is_valid_on_another_node_with_the_same_secret_only() -> None:
    nonce = NonceIssuer(SECRET, LIFETIME).issue(T0, REALM)
    assert NonceIssuer(SECRET, LIFETIME).check(nonce, T0 + 5, REALM) is NonceStatus.VALID
    other = NonceIssuer(b"another-secret-entirely-000000", LIFETIME)
    assert other.check(nonce, T0 + 5, REALM) is NonceStatus.INVALID


def test_forged_garbled_and_foreign_realm_nonces_are_invalid() -> None:
    issuer = NonceIssuer(SECRET, LIFETIME)
    nonce = issuer.issue(T0, REALM)
    flipped = nonce[:20] + ("A" if nonce[20] != "A" else "B") + nonce[21:]
    assert issuer.check(flipped, T0, REALM) is NonceStatus.INVALID
    assert issuer.check(nonce, T0, "other.realm") is NonceStatus.INVALID
    for garbage in ["", "x" * 43, nonce + "A", nonce[:-1], "é" * 43, "+/" * 21 + "a"]:
        assert issuer.check(garbage, T0, REALM) is NonceStatus.INVALID
    assert issuer.check(None, T0, REALM) is NonceStatus.INVALID  # type: ignore[arg-type]


def test_nonce_from_far_future_is_invalid_but_small_skew_is_tolerated() -> None:
    issuer = NonceIssuer(SECRET, LIFETIME, max_clock_skew=30.0)
    assert issuer.check(issuer.issue(T0 + 10, REALM), T0, REALM) is NonceStatus.VALID
    assert issuer.check(issuer.issue(T0 + 3600, REALM), T0, REALM) is NonceStatus.INVALID


def test_nonces_are_unique_and_short_secret_refused() -> None:
    issuer = NonceIssuer(SECRET, LIFETIME)
    nonces = {issuer.issue(T0, REALM) for _ in range(200)}
    assert len(nonces) == 200
    with pytest.raises(ValueError):
        NonceIssuer(b"short", LIFETIME)


# ------------------------------------------------------------------ nonce counts


def test_nonce_count_replay_is_refused() -> None:
    tracker = NonceCountTracker(max_entries=100, lifetime=LIFETIME)
    assert tracker.accept("n", 1, T0)
    assert not tracker.accept("n", 1, T0)
    assert tracker.accept("n", 2, T0)
    assert not tracker.accept("n", 2, T0)
    assert not tracker.accept("n", 0, T0)
    assert tracker.accept("other", 1, T0)


def test_nonce_count_out_of_order_within_window() -> None:
    tracker = NonceCountTracker(max_entries=10, lifetime=LIFETIME, window=8)
    assert tracker.accept("n", 5, T0)
    assert tracker.accept("n", 3, T0)
    assert not tracker.accept("n", 3, T0)
    assert tracker.accept("n", 4, T0)
    assert tracker.accept("n", 20, T0)
    assert not tracker.accept("n", 5, T0)  # older than the window
    assert tracker.accept("n", 13, T0)  # 20 - 1 - 13 = 6 < 8
    assert not tracker.accept("n", 13, T0)
    assert not tracker.accept("n", 20, T0)


def test_nonce_count_entries_expire_with_lifetime() -> None:
    tracker = NonceCountTracker(max_entries=10, lifetime=60)
    tracker.accept("n", 1, T0)
    assert len(tracker) == 1
    assert not tracker.accept("n", 1, T0 + 59)
    tracker.accept("m", 1, T0 + 61)
    assert len(tracker) == 1  # "n" expired


def test_nonce_count_memory_cap_and_forgotten_nonces() -> None:
    tracker = NonceCountTracker(max_entries=50, lifetime=LIFETIME)
    for i in range(500):
        assert tracker.accept(f"n{i}", 1, T0 + i * 0.01, issued_at=T0 + i * 0.01)
    assert len(tracker) == 50
    assert tracker.evictions == 450
    # An evicted nonce cannot be vouched for: refused rather than replayable.
    assert tracker.observe("n0", 1, T0 + 6, issued_at=T0) is NonceUse.FORGOTTEN
    # A nonce issued after the evictions is tracked normally.
    assert tracker.observe("fresh", 1, T0 + 6, issued_at=T0 + 6) is NonceUse.ACCEPTED


# ------------------------------------------------------------------ authenticator


class _Accounts:
    def __init__(self, *stored: StoredCredentials) -> None:
        self._by_name = {item.username: item for item in stored}

    def __call__(self, username: str) -> StoredCredentials | None:
        return self._by_name.get(username)


def _authenticator(
    accounts: _Accounts, algorithms: list[str] | None = None, **kwargs
) -> DigestAuthenticator:
    return DigestAuthenticator(
        REALM,
        algorithms or ["MD5", "SHA-256"],
        NonceIssuer(SECRET, LIFETIME),
        NonceCountTracker(max_entries=1000, lifetime=LIFETIME),
        accounts,
        **kwargs,
    )


def _answer(
    auth: DigestAuthenticator,
    now: float,
    algorithm: str,
    username: str,
    password: str,
    nc: int = 1,
    method: str = "REGISTER",
    uri: str = REGISTER_URI,
) -> DigestCredentials:
    challenges = [parse_challenge(value) for value in auth.challenges(now)]
    challenge = next(item for item in challenges if item.algorithm == algorithm)
    header = build_authorization(challenge, method, uri, username, password, nc=nc)
    credentials = parse_credentials(header)
    assert credentials is not None
    return credentials


ALICE = StoredCredentials("alice", password="alice-pw")


def test_challenges_follow_the_configured_order_with_qop_auth() -> None:
    auth = _authenticator(_Accounts(ALICE), ["SHA-256", "MD5"])
    values = auth.challenges(T0)
    challenges = [parse_challenge(value) for value in values]
    assert [item.algorithm for item in challenges] == ["SHA-256", "MD5"]
    legacy_first = _authenticator(_Accounts(ALICE), ["MD5", "SHA-256"])
    assert [parse_challenge(v).algorithm for v in legacy_first.challenges(T0)] == [
        "MD5", "SHA-256"
    ]
    assert all(item.qop == ("auth",) and item.realm == REALM for item in challenges)
    assert all(not item.stale for item in challenges)
    assert all(item.stale for item in map(parse_challenge, auth.challenges(T0, stale=True)))


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256", "MD5-sess", "SHA-256-sess"])
def test_round_trip_client_to_server(algorithm: str) -> None:
    auth = _authenticator(_Accounts(ALICE), [algorithm])
    credentials = _answer(auth, T0, algorithm, "alice", "alice-pw")
    result = auth.verify(credentials, "REGISTER", T0 + 1, request_uri=REGISTER_URI)
    assert result.outcome is AuthOutcome.OK
    assert result.ok
    assert result.username == "alice"
    assert result.algorithm == algorithm


def test_ha1_only_credentials_serve_only_their_algorithm() -> None:
    md5_only = StoredCredentials("bob", ha1_md5=compute_ha1("MD5", "bob", REALM, "bob-pw"))
    sha_only = StoredCredentials(
        "carol", ha1_sha256=compute_ha1("SHA-256", "carol", REALM, "carol-pw").upper()
    )
    auth = _authenticator(_Accounts(md5_only, sha_only))
    ok = auth.verify(_answer(auth, T0, "MD5", "bob", "bob-pw"), "REGISTER", T0)
    assert ok.outcome is AuthOutcome.OK
    refused = auth.verify(_answer(auth, T0, "SHA-256", "bob", "bob-pw"), "REGISTER", T0)
    assert refused.outcome is AuthOutcome.FAILED
    ok = auth.verify(_answer(auth, T0, "SHA-256", "carol", "carol-pw"), "REGISTER", T0)
    assert ok.outcome is AuthOutcome.OK
    refused = auth.verify(_answer(auth, T0, "MD5", "carol", "carol-pw"), "REGISTER", T0)
    assert refused.outcome is AuthOutcome.FAILED


def test_missing_credentials_or_other_realm_is_a_challenge() -> None:
    auth = _authenticator(_Accounts(ALICE))
    assert auth.verify(None, "REGISTER", T0).outcome is AuthOutcome.CHALLENGE
    credentials = _answer(auth, T0, "MD5", "alice", "alice-pw")
    credentials.realm = "elsewhere.example"
    assert auth.verify(credentials, "REGISTER", T0).outcome is AuthOutcome.CHALLENGE


def test_stale_nonce_with_right_password_is_stale_and_with_wrong_password_failed() -> None:
    auth = _authenticator(_Accounts(ALICE))
    later = T0 + LIFETIME + 10
    right = _answer(auth, T0, "SHA-256", "alice", "alice-pw")
    assert auth.verify(right, "REGISTER", later).outcome is AuthOutcome.STALE
    wrong = _answer(auth, T0, "SHA-256", "alice", "guess")
    assert auth.verify(wrong, "REGISTER", later).outcome is AuthOutcome.FAILED


def test_forged_nonce_fails() -> None:
    auth = _authenticator(_Accounts(ALICE))
    forger = NonceIssuer(b"not-the-cluster-secret-at-all!!", LIFETIME)
    challenge = parse_challenge(
        f'Digest realm="{REALM}", nonce="{forger.issue(T0, REALM)}", qop="auth"'
    )
    header = build_authorization(challenge, "REGISTER", REGISTER_URI, "alice", "alice-pw")
    result = auth.verify(parse_credentials(header), "REGISTER", T0)
    assert result.outcome is AuthOutcome.FAILED
    assert result.reason == "invalid nonce"


def test_replayed_nonce_count_is_refused_and_next_count_accepted() -> None:
    auth = _authenticator(_Accounts(ALICE))
    first = _answer(auth, T0, "SHA-256", "alice", "alice-pw", nc=1)
    assert auth.verify(first, "REGISTER", T0).outcome is AuthOutcome.OK
    replay = auth.verify(first, "REGISTER", T0 + 1)
    assert replay.outcome is AuthOutcome.FAILED
    assert replay.reason == "replayed nonce count"
    challenge = parse_challenge(
        f'Digest realm="{REALM}", nonce="{first.nonce}", qop="auth", algorithm=SHA-256'
    )
    second = parse_credentials(
        build_authorization(challenge, "REGISTER", REGISTER_URI, "alice", "alice-pw", nc=2)
    )
    assert auth.verify(second, "REGISTER", T0 + 2).outcome is AuthOutcome.OK


def test_nonce_reused_without_qop_is_refused_as_stale() -> None:
    auth = _authenticator(_Accounts(ALICE))
    nonce = auth.issuer.issue(T0, REALM)
    legacy = parse_challenge(f'Digest realm="{REALM}", nonce="{nonce}"')
    credentials = parse_credentials(
        build_authorization(legacy, "REGISTER", REGISTER_URI, "alice", "alice-pw")
    )
    assert credentials.qop is None
    assert auth.verify(credentials, "REGISTER", T0).outcome is AuthOutcome.OK
    assert auth.verify(credentials, "REGISTER", T0 + 1).outcome is AuthOutcome.STALE
    strict = _authenticator(_Accounts(ALICE), accept_rfc2069=False)
    assert strict.verify(credentials, "REGISTER", T0).outcome is AuthOutcome.FAILED


def test_unknown_user_and_wrong_password_are_indistinguishable(monkeypatch) -> None:
    calls: list[str] = []

    class CountingHashlib:
        @staticmethod
        def new(name: str, data: bytes = b""):
            calls.append(name)
            return hashlib.new(name, data)

    auth = _authenticator(_Accounts(ALICE))
    wrong_password = _answer(auth, T0, "SHA-256", "alice", "guess")
    unknown_user = _answer(auth, T0, "SHA-256", "mallory", "guess")
    monkeypatch.setattr(sip.digest, "hashlib", CountingHashlib)

    calls.clear()
    result_wrong = auth.verify(wrong_password, "REGISTER", T0)
    work_wrong = len(calls)
    calls.clear()
    result_unknown = auth.verify(unknown_user, "REGISTER", T0)
    work_unknown = len(calls)

    assert result_wrong.outcome is result_unknown.outcome is AuthOutcome.FAILED
    assert work_wrong == work_unknown > 0
    # The reasons differ for the logs, but never carry secrets or responses.
    for result, credentials in ((result_wrong, wrong_password), (result_unknown, unknown_user)):
        assert "guess" not in result.reason
        assert credentials.response not in result.reason


def test_algorithm_not_offered_and_uri_mismatch_fail() -> None:
    auth = _authenticator(_Accounts(ALICE), ["SHA-256"])
    md5_auth = _authenticator(_Accounts(ALICE), ["MD5"])
    md5_credentials = _answer(md5_auth, T0, "MD5", "alice", "alice-pw")
    assert auth.verify(md5_credentials, "REGISTER", T0).outcome is AuthOutcome.FAILED
    credentials = _answer(auth, T0, "SHA-256", "alice", "alice-pw", uri="sip:elsewhere")
    result = auth.verify(credentials, "REGISTER", T0, request_uri=REGISTER_URI)
    assert result.outcome is AuthOutcome.FAILED
    # Nothing was recorded for the refused request: the same credentials still work when
    # the URI matches.
    assert auth.verify(credentials, "REGISTER", T0, request_uri="sip:elsewhere").ok


def test_auth_int_body_is_checked() -> None:
    auth = _authenticator(_Accounts(ALICE), ["SHA-256"])
    nonce = auth.issuer.issue(T0, REALM)
    challenge = parse_challenge(
        f'Digest realm="{REALM}", nonce="{nonce}", qop="auth-int", algorithm=SHA-256'
    )
    body = b"v=0\r\n"
    credentials = parse_credentials(
        build_authorization(challenge, "INVITE", "sip:bob@x", "alice", "alice-pw", body=body)
    )
    assert auth.verify(credentials, "INVITE", T0, body=b"tampered").outcome is AuthOutcome.FAILED
    assert auth.verify(credentials, "INVITE", T0, body=body).outcome is AuthOutcome.OK


def test_stored_credentials_repr_hides_secrets() -> None:
    stored = StoredCredentials("alice", password="alice-pw", ha1_md5="abcd1234")
    assert "alice-pw" not in repr(stored)
    assert "abcd1234" not in repr(stored)


def test_tracker_must_cover_nonce_lifetime() -> None:
    with pytest.raises(ValueError):
        DigestAuthenticator(
            REALM,
            ["MD5"],
            NonceIssuer(SECRET, 600),
            NonceCountTracker(max_entries=10, lifetime=60),
            _Accounts(),
        )
    with pytest.raises(ValueError):
        _authenticator(_Accounts(), ["SHA-1"])


# ------------------------------------------------------------------ bans


def test_source_banned_after_too_many_failures_and_ban_expires() -> None:
    bans = FailureBan(max_failures_per_source=3, max_failures_per_user=100, window=60, ban_time=600)
    assert bans.record_failure("192.0.2.1", "alice", T0) is None
    assert bans.record_failure("192.0.2.1", "bob", T0 + 1) is None
    event = bans.record_failure("192.0.2.1", "carol", T0 + 2)
    assert event is not None
    assert event.reason == "source"
    assert event.source_ip == "192.0.2.1"
    assert event.until == T0 + 2 + 600
    assert bans.is_banned("192.0.2.1", T0 + 3)
    assert not bans.is_banned("192.0.2.2", T0 + 3)
    assert bans.banned_count(T0 + 3) == 1
    assert bans.record_failure("192.0.2.1", "alice", T0 + 4) is None  # no new ban
    assert bans.is_banned("192.0.2.1", T0 + 601)
    assert not bans.is_banned("192.0.2.1", T0 + 603)
    assert bans.banned_count(T0 + 603) == 0


def test_zero_ban_time_disables_banning() -> None:
    bans = FailureBan(max_failures_per_source=1, max_failures_per_user=1, window=60, ban_time=0)
    assert bans.record_failure("192.0.2.1", "alice", T0) is None
    assert not bans.is_banned("192.0.2.1", T0)
    assert bans.banned_count(T0) == 0


def test_failures_spread_beyond_the_window_do_not_ban() -> None:
    bans = FailureBan(max_failures_per_source=3, max_failures_per_user=100, window=60, ban_time=600)
    for i in range(10):
        assert bans.record_failure("192.0.2.1", "alice", T0 + i * 31) is None
    assert not bans.is_banned("192.0.2.1", T0 + 400)


def test_user_under_distributed_attack_bans_each_failing_source() -> None:
    bans = FailureBan(max_failures_per_source=10, max_failures_per_user=3, window=60, ban_time=600)
    assert bans.record_failure("198.51.100.1", "alice", T0) is None
    assert bans.record_failure("198.51.100.2", "alice", T0 + 1) is None
    event = bans.record_failure("198.51.100.3", "alice", T0 + 2)
    assert event is not None and event.reason == "user" and event.username == "alice"
    assert event.source_ip == "198.51.100.3"
    # While the user is under attack every further failing source is banned at once.
    event = bans.record_failure("198.51.100.4", "alice", T0 + 3)
    assert event is not None and event.source_ip == "198.51.100.4"
    assert not bans.is_banned("198.51.100.1", T0 + 3)
    assert bans.banned_count(T0 + 3) == 2
    # Another user is not affected, and the attack window ends.
    assert bans.record_failure("198.51.100.5", "bob", T0 + 4) is None
    assert bans.record_failure("198.51.100.6", "alice", T0 + 200) is None


def test_success_does_not_lift_a_ban_but_forgets_that_users_failures() -> None:
    bans = FailureBan(max_failures_per_source=3, max_failures_per_user=100, window=60, ban_time=600)
    bans.record_failure("192.0.2.9", "alice", T0)
    bans.record_failure("192.0.2.9", "alice", T0 + 1)
    bans.record_success("192.0.2.9", "alice")
    assert bans.record_failure("192.0.2.9", "alice", T0 + 2) is None
    assert bans.record_failure("192.0.2.9", "alice", T0 + 3) is None
    assert bans.record_failure("192.0.2.9", "alice", T0 + 4) is not None
    bans.record_success("192.0.2.9", "alice")
    assert bans.is_banned("192.0.2.9", T0 + 5)


def test_ban_memory_is_bounded_under_a_flood_of_sources() -> None:
    bans = FailureBan(
        max_failures_per_source=5,
        max_failures_per_user=1000,
        window=60,
        ban_time=600,
        max_tracked=100,
        max_bans=50,
    )
    for i in range(5000):
        source = f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}"
        bans.record_failure(source, f"user{i}", T0 + i * 0.001)
    assert bans.tracked_sources <= 100
    assert bans.tracked_users <= 100
    for i in range(200):
        for _ in range(5):
            bans.record_failure(f"172.16.0.{i}", "x", T0 + 10)
    assert bans.banned_count(T0 + 10) == 50
    assert bans.is_banned("172.16.0.199", T0 + 10)  # newest bans are kept
