"""Digest authentication policy for the switch: nonces, replay protection, verification, bans.

Nothing here does I/O or reads a clock: every time-dependent call takes ``now`` (seconds,
any monotonic-ish float base shared by the caller). The caller turns the outcomes into
SIP responses, metrics and log events:

* :class:`NonceIssuer` makes stateless, HMAC-signed nonces. Every node configured with the
  same secret accepts the nonces of every other node, so a client may be challenged by one
  node and answer to another.
* :class:`NonceCountTracker` refuses replayed ``nc`` values per nonce, in bounded memory.
  It is per node: a request captured on the wire and replayed to a *different* node
  within the nonce lifetime is not detected by this tracker (a shared store with the same
  interface would close that gap).
* :class:`DigestAuthenticator` verifies credentials against stored passwords or HA1 values.
* :class:`FailureBan` counts failures and bans abusive sources.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import re
import secrets
import struct
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from sip.digest import (
    DigestCredentials,
    canonical_algorithm,
    compute_ha1,
    format_challenge,
    verify_response,
)

__all__ = [
    "AuthOutcome",
    "AuthResult",
    "BanEvent",
    "DigestAuthenticator",
    "FailureBan",
    "NonceCountTracker",
    "NonceIssuer",
    "NonceStatus",
    "NonceUse",
    "StoredCredentials",
]

# ----------------------------------------------------------------------------- nonces

_TIMESTAMP_BYTES = 8  # milliseconds, unsigned big-endian
_RANDOM_BYTES = 8
_MAC_BYTES = 16  # HMAC-SHA256 truncated to 128 bits
_NONCE_BYTES = _TIMESTAMP_BYTES + _RANDOM_BYTES + _MAC_BYTES
_NONCE_TEXT_LENGTH = 43  # base64url of 32 bytes without padding
_NONCE_RE = re.compile(rf"[A-Za-z0-9_-]{{{_NONCE_TEXT_LENGTH}}}")
_MIN_SECRET_BYTES = 16


class NonceStatus(enum.Enum):
    VALID = "valid"
    STALE = "stale"  # well-formed and signed by us, but expired
    INVALID = "invalid"  # forged, garbled, for another realm, or from the far future


class NonceIssuer:
    """Stateless nonces: base64url(timestamp ‖ random ‖ HMAC-SHA256(secret, ts ‖ random ‖ realm)).

    The timestamp is in milliseconds, the MAC is truncated to 16 bytes; the nonce is 43
    characters of ``[A-Za-z0-9_-]``. ``max_clock_skew`` tolerates nonces dated slightly in
    the future, as issued by another node whose clock runs ahead.
    """

    def __init__(self, secret: bytes, lifetime: float, max_clock_skew: float = 30.0) -> None:
        if len(secret) < _MIN_SECRET_BYTES:
            raise ValueError(f"nonce secret must be at least {_MIN_SECRET_BYTES} bytes")
        if lifetime <= 0:
            raise ValueError("nonce lifetime must be positive")
        self._secret = bytes(secret)
        self.lifetime = float(lifetime)
        self.max_clock_skew = float(max_clock_skew)

    def _mac(self, stamp_and_random: bytes, realm: str) -> bytes:
        message = stamp_and_random + realm.encode("utf-8")
        return hmac.new(self._secret, message, hashlib.sha256).digest()[:_MAC_BYTES]

    def issue(self, now: float, realm: str) -> str:
        millis = max(0, int(now * 1000))
        stamp_and_random = struct.pack(">Q", millis) + secrets.token_bytes(_RANDOM_BYTES)
        raw = stamp_and_random + self._mac(stamp_and_random, realm)
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    def issued_at(self, nonce: str, realm: str) -> float | None:
        """The issue time of a nonce signed by us for ``realm``, or None."""
        if not isinstance(nonce, str) or _NONCE_RE.fullmatch(nonce) is None:
            return None
        try:
            raw = base64.urlsafe_b64decode(nonce + "=")
        except (binascii.Error, ValueError):
            return None
        if len(raw) != _NONCE_BYTES:
            return None
        stamp_and_random, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(stamp_and_random, realm)):
            return None
        (millis,) = struct.unpack(">Q", stamp_and_random[:_TIMESTAMP_BYTES])
        return millis / 1000.0

    def check(self, nonce: str, now: float, realm: str) -> NonceStatus:
        issued = self.issued_at(nonce, realm)
        if issued is None:
            return NonceStatus.INVALID
        if issued > now + self.max_clock_skew:
            return NonceStatus.INVALID
        if now - issued > self.lifetime:
            return NonceStatus.STALE
        return NonceStatus.VALID


class NonceUse(enum.Enum):
    ACCEPTED = "accepted"
    REPLAYED = "replayed"  # this nc (or an older one out of the window) was already used
    FORGOTTEN = "forgotten"  # the nonce may have been evicted: cannot vouch, ask for a new one


@dataclass(slots=True)
class _NonceCounts:
    first_seen: float
    expires_at: float
    issued_at: float | None
    highest: int
    seen_below: int  # bit i set <=> nc == highest - 1 - i was seen


class NonceCountTracker:
    """Refuses replayed nonce counts, per nonce, in bounded memory.

    For each nonce it keeps the highest ``nc`` seen and a bitmap of the ``window`` values
    below it, so out-of-order requests within the window are accepted once, and anything
    older than the window is refused. A nonce used without qop is recorded as ``nc=1``,
    so its second use is refused.

    Entries live ``lifetime`` seconds after first use (or after ``issued_at`` when that is
    later); with ``lifetime`` at least the nonce lifetime, an entry outlives its nonce. When
    more than ``max_entries`` nonces are tracked the oldest entry is evicted; to keep replay
    protection for evicted nonces, pass ``issued_at`` and unknown nonces issued no later
    than the newest evicted one are answered FORGOTTEN (the caller re-challenges).
    """

    def __init__(self, max_entries: int, lifetime: float = 300.0, window: int = 64) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if not 1 <= window <= 1024:
            raise ValueError("window must be between 1 and 1024")
        self.max_entries = max_entries
        self.lifetime = float(lifetime)
        self.window = window
        self._entries: OrderedDict[str, _NonceCounts] = OrderedDict()
        self._evicted_issued_watermark: float | None = None
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        # Entries are in first-use order; expiry is nearly that order, and any straggler
        # is bounded by max_entries anyway.
        while self._entries:
            first = next(iter(self._entries.values()))
            if first.expires_at > now:
                break
            self._entries.popitem(last=False)

    def _evict_oldest(self) -> None:
        _, entry = self._entries.popitem(last=False)
        self.evictions += 1
        # A nonce is issued before its first use, so the first-use time bounds the issue
        # time when the caller did not pass it.
        issued = entry.issued_at if entry.issued_at is not None else entry.first_seen
        watermark = self._evicted_issued_watermark
        if watermark is None or issued > watermark:
            self._evicted_issued_watermark = issued

    def observe(self, nonce: str, nc: int, now: float, issued_at: float | None = None) -> NonceUse:
        if nc < 1:
            return NonceUse.REPLAYED
        self._expire(now)
        entry = self._entries.get(nonce)
        if entry is None:
            watermark = self._evicted_issued_watermark
            if watermark is not None and issued_at is not None and issued_at <= watermark:
                return NonceUse.FORGOTTEN
            while len(self._entries) >= self.max_entries:
                self._evict_oldest()
            # The entry must outlive the nonce's validity, also for a nonce dated a little
            # in the future by a node whose clock runs ahead.
            start = now if issued_at is None else max(now, issued_at)
            self._entries[nonce] = _NonceCounts(
                first_seen=now,
                expires_at=start + self.lifetime,
                issued_at=issued_at,
                highest=nc,
                seen_below=0,
            )
            return NonceUse.ACCEPTED
        if nc > entry.highest:
            shift = nc - entry.highest
            mask = (1 << self.window) - 1
            if shift > self.window:
                entry.seen_below = 0
            else:
                entry.seen_below = ((entry.seen_below << shift) | (1 << (shift - 1))) & mask
            entry.highest = nc
            return NonceUse.ACCEPTED
        if nc == entry.highest:
            return NonceUse.REPLAYED
        offset = entry.highest - 1 - nc
        if offset >= self.window:
            return NonceUse.REPLAYED
        bit = 1 << offset
        if entry.seen_below & bit:
            return NonceUse.REPLAYED
        entry.seen_below |= bit
        return NonceUse.ACCEPTED

    def accept(self, nonce: str, nc: int, now: float, issued_at: float | None = None) -> bool:
        """True when (nonce, nc) was not seen before (and is recorded now)."""
        return self.observe(nonce, nc, now, issued_at) is NonceUse.ACCEPTED


# ---------------------------------------------------------------------- authenticator


@dataclass(slots=True, frozen=True)
class StoredCredentials:
    """What the account store holds for a SIP user: a password or precomputed HA1 values.

    The HA1 values are H(username:realm:password) for the authenticator's realm.
    """

    username: str
    password: str | None = None
    ha1_md5: str | None = None
    ha1_sha256: str | None = None

    def __repr__(self) -> str:  # never show secrets in logs or tracebacks
        return f"StoredCredentials(username={self.username!r})"

    def ha1(self, algorithm: str, realm: str) -> str | None:
        """The base HA1 for ``algorithm`` (the -sess variants use the same base), or None
        when it cannot be served (e.g. only an MD5 HA1 is stored and SHA-256 is asked)."""
        canonical = canonical_algorithm(algorithm)
        if canonical is None:
            return None
        if self.password is not None:
            return compute_ha1(canonical, self.username, realm, self.password)
        stored = self.ha1_sha256 if canonical.startswith("SHA-256") else self.ha1_md5
        return stored.lower() if stored else None


class AuthOutcome(enum.Enum):
    OK = "ok"
    CHALLENGE = "challenge"  # no credentials, or credentials for another realm
    STALE = "stale"  # right password, expired nonce: challenge again with stale=true
    FAILED = "failed"  # answer with a fresh challenge, count toward bans


@dataclass(slots=True, frozen=True)
class AuthResult:
    outcome: AuthOutcome
    username: str | None
    reason: str  # for logs; never contains a secret or a digest response
    algorithm: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is AuthOutcome.OK




class DigestAuthenticator:
    """Verifies Digest credentials for one realm.

    Unknown users and wrong passwords give the same outcome (FAILED) and the same amount of
    hashing: for an unknown user (or an algorithm the stored credentials cannot serve) the
    response is computed against a dummy HA1 derived from a random password. The ``reason``
    string tells them apart for the logs only.

    A nonce-count replay with qop is FAILED. A nonce reused without qop (RFC 2069 client) is
    STALE, as is a nonce the tracker may have forgotten: the client gets a fresh nonce
    without re-prompting, and an attacker replaying gains nothing. Clients that omit qop are
    accepted only when ``accept_rfc2069`` is True.
    """

    def __init__(
        self,
        realm: str,
        algorithms: list[str],
        issuer: NonceIssuer,
        tracker: NonceCountTracker,
        lookup_credentials: Callable[[str], StoredCredentials | None],
        accept_rfc2069: bool = True,
    ) -> None:
        canonical: list[str] = []
        for name in algorithms:
            algorithm = canonical_algorithm(name)
            if algorithm is None:
                raise ValueError(f"unsupported digest algorithm: {name!r}")
            if algorithm not in canonical:
                canonical.append(algorithm)
        if not canonical:
            raise ValueError("at least one digest algorithm is needed")
        self.realm = realm
        if tracker.lifetime < issuer.lifetime:
            raise ValueError("nonce-count tracker lifetime must cover the nonce lifetime")
        # RFC 8760 §2.4: challenges go in the server's order of preference; the operator's
        # order is kept (SHA-256 first by default; MD5 first for legacy phones that answer
        # only the first challenge they see).
        self.algorithms = canonical
        self.issuer = issuer
        self.tracker = tracker
        self.lookup_credentials = lookup_credentials
        self.accept_rfc2069 = accept_rfc2069
        self._dummy_password = secrets.token_hex(16)

    def challenges(self, now: float, stale: bool = False, *,
                   md5_first: bool = False) -> list[str]:
        """One challenge header value per configured algorithm, in the configured order.
        ``md5_first``: the MD5 challenge alone when MD5 is configured, for clients that
        understand nothing else and fail on a second challenge (browser SIP libraries
        over WebSocket such as JsSIP)."""
        nonce = self.issuer.issue(now, self.realm)
        algorithms = list(self.algorithms)
        if md5_first and "MD5" in algorithms:
            algorithms = ["MD5"]
        return [
            format_challenge(self.realm, nonce, algorithm, qop="auth", stale=stale)
            for algorithm in algorithms
        ]

    def verify(
        self,
        credentials: DigestCredentials | None,
        method: str,
        now: float,
        body: bytes = b"",
        request_uri: str | None = None,
    ) -> AuthResult:
        """Check credentials for a request. ``request_uri``, when given, must equal the
        digest ``uri`` parameter (RFC 3261 §22.4)."""
        if credentials is None:
            return AuthResult(AuthOutcome.CHALLENGE, None, "no credentials")
        username = credentials.username
        if credentials.realm != self.realm:
            return AuthResult(AuthOutcome.CHALLENGE, username, "credentials for another realm")
        algorithm = canonical_algorithm(credentials.algorithm)
        if algorithm is None or algorithm not in self.algorithms:
            return self._failed(username, "algorithm not offered")
        if credentials.userhash:
            return self._failed(username, "userhash not offered")
        if credentials.qop is None:
            if not self.accept_rfc2069:
                return self._failed(username, "qop missing")
        elif credentials.qop not in ("auth", "auth-int"):
            return self._failed(username, "qop not supported")
        if request_uri is not None and credentials.uri != request_uri:
            return self._failed(username, "digest uri does not match request-uri")
        nonce_status = self.issuer.check(credentials.nonce, now, self.realm)
        if nonce_status is NonceStatus.INVALID:
            return self._failed(username, "invalid nonce")

        stored = self.lookup_credentials(username)
        ha1 = stored.ha1(algorithm, self.realm) if stored is not None else None
        if ha1 is None:
            # Same work as a stored password: one HA1 plus the response.
            dummy_ha1 = compute_ha1(algorithm, username, self.realm, self._dummy_password)
            verify_response(credentials, dummy_ha1, method, body)
            reason = "unknown user" if stored is None else "no credentials for algorithm"
            return self._failed(username, reason, algorithm)
        if not verify_response(credentials, ha1, method, body):
            return self._failed(username, "wrong response", algorithm)

        if nonce_status is NonceStatus.STALE:
            return AuthResult(AuthOutcome.STALE, username, "stale nonce", algorithm)
        issued_at = self.issuer.issued_at(credentials.nonce, self.realm)
        nonce_count = credentials.nonce_count if credentials.qop is not None else 1
        use = self.tracker.observe(credentials.nonce, nonce_count or 0, now, issued_at)
        if use is NonceUse.FORGOTTEN:
            return AuthResult(AuthOutcome.STALE, username, "nonce no longer tracked", algorithm)
        if use is NonceUse.REPLAYED:
            if credentials.qop is None:
                return AuthResult(
                    AuthOutcome.STALE, username, "nonce reused without qop", algorithm
                )
            return self._failed(username, "replayed nonce count", algorithm)
        return AuthResult(AuthOutcome.OK, username, "authenticated", algorithm)

    @staticmethod
    def _failed(username: str, reason: str, algorithm: str | None = None) -> AuthResult:
        return AuthResult(AuthOutcome.FAILED, username, reason, algorithm)


# ---------------------------------------------------------------------------- banning


@dataclass(slots=True, frozen=True)
class BanEvent:
    source_ip: str
    reason: str  # "source" or "user"
    username: str | None
    banned_at: float
    until: float
    failures: int


class FailureBan:
    """Bans source addresses that fail authentication too often.

    Two sliding windows of ``window`` seconds:

    * per source IP: ``max_failures_per_source`` failures from one IP (against any users)
      ban that IP (reason ``"source"``);
    * per username: ``max_failures_per_user`` failures against one user from any IPs mark
      the user as under attack; while that lasts, every further failing source against
      the user is banned at once (reason ``"user"``). This stops a distributed guess
      attack one source at a time; the price is that the user's own device, if it fails
      during the attack, is banned too.

    A ban lasts ``ban_time`` seconds (0 disables banning); ``record_success`` never lifts one, it only forgets
    the failures of that user from that source (a phone whose password was just fixed).
    Memory is bounded: at most ``max_tracked`` sources, ``max_tracked`` users and
    ``max_bans`` bans are kept; the least recently updated are evicted first.
    """

    def __init__(
        self,
        max_failures_per_source: int,
        max_failures_per_user: int,
        window: float,
        ban_time: float,
        max_tracked: int = 10_000,
        max_bans: int = 100_000,
    ) -> None:
        if max_failures_per_source < 1 or max_failures_per_user < 1:
            raise ValueError("failure limits must be at least 1")
        if max_tracked < 1 or max_bans < 1:
            raise ValueError("memory caps must be at least 1")
        self.max_failures_per_source = max_failures_per_source
        self.max_failures_per_user = max_failures_per_user
        self.window = float(window)
        self.ban_time = float(ban_time)
        self.max_tracked = max_tracked
        self.max_bans = max_bans
        # source -> (time, username) of recent failures, newest last
        self._by_source: OrderedDict[str, deque[tuple[float, str]]] = OrderedDict()
        # username -> (time, source) of recent failures, newest last
        self._by_user: OrderedDict[str, deque[tuple[float, str]]] = OrderedDict()
        # source -> ban; insertion order is expiry order (constant ban_time)
        self._bans: OrderedDict[str, BanEvent] = OrderedDict()

    @property
    def tracked_sources(self) -> int:
        return len(self._by_source)

    @property
    def tracked_users(self) -> int:
        return len(self._by_user)

    def _expire_bans(self, now: float) -> None:
        while self._bans:
            first = next(iter(self._bans.values()))
            if first.until > now:
                break
            self._bans.popitem(last=False)

    def _prune(self, history: deque[tuple[float, str]], now: float) -> None:
        horizon = now - self.window
        while history and history[0][0] <= horizon:
            history.popleft()

    @staticmethod
    def _touch(
        table: OrderedDict[str, deque[tuple[float, str]]], key: str, maxlen: int, cap: int
    ) -> deque[tuple[float, str]]:
        history = table.get(key)
        if history is None:
            while len(table) >= cap:
                table.popitem(last=False)
            history = deque(maxlen=maxlen)
            table[key] = history
        else:
            table.move_to_end(key)
        return history

    def _ban(
        self, source_ip: str, reason: str, username: str, now: float, failures: int
    ) -> BanEvent:
        while len(self._bans) >= self.max_bans:
            self._bans.popitem(last=False)
        event = BanEvent(
            source_ip=source_ip,
            reason=reason,
            username=username,
            banned_at=now,
            until=now + self.ban_time,
            failures=failures,
        )
        self._bans[source_ip] = event
        self._by_source.pop(source_ip, None)
        return event

    def record_failure(self, source_ip: str, username: str | None, now: float) -> BanEvent | None:
        """Count one failure; return the ban it causes, if it causes a new one.

        With ``ban_time`` 0 banning is disabled: nothing is counted and None is returned.
        """
        if self.ban_time <= 0 or self.is_banned(source_ip, now):
            return None
        user_key = username or ""
        source_history = self._touch(
            self._by_source, source_ip, self.max_failures_per_source, self.max_tracked
        )
        self._prune(source_history, now)
        source_history.append((now, user_key))
        if len(source_history) >= self.max_failures_per_source:
            return self._ban(source_ip, "source", user_key, now, len(source_history))
        if not username:
            return None
        user_history = self._touch(
            self._by_user, user_key, self.max_failures_per_user, self.max_tracked
        )
        self._prune(user_history, now)
        user_history.append((now, source_ip))
        if len(user_history) >= self.max_failures_per_user:
            return self._ban(source_ip, "user", user_key, now, len(user_history))
        return None

    def record_success(self, source_ip: str, username: str | None) -> None:
        """Forget the failures of ``username`` from ``source_ip``. Does not lift a ban."""
        user_key = username or ""
        source_history = self._by_source.get(source_ip)
        if source_history is not None:
            kept = [item for item in source_history if item[1] != user_key]
            source_history.clear()
            source_history.extend(kept)
            if not source_history:
                del self._by_source[source_ip]
        user_history = self._by_user.get(user_key)
        if user_history is not None:
            kept = [item for item in user_history if item[1] != source_ip]
            user_history.clear()
            user_history.extend(kept)
            if not user_history:
                del self._by_user[user_key]

    def is_banned(self, source_ip: str, now: float) -> bool:
        ban = self._bans.get(source_ip)
        if ban is None:
            return False
        if ban.until <= now:
            self._expire_bans(now)
            self._bans.pop(source_ip, None)
            return False
        return True

    def ban_for(self, source_ip: str, now: float) -> BanEvent | None:
        """The active ban of ``source_ip``, if any."""
        return self._bans.get(source_ip) if self.is_banned(source_ip, now) else None

    def banned_count(self, now: float) -> int:
        self._expire_bans(now)
        return len(self._bans)
