"""The registrar's location service: where each address-of-record can be reached.

The SIP side of REGISTER (Contact parsing, Expires, 423, digest) lives in
``switch.registrar``; it hands this module plain data. Here we implement RFC 3261
§10.3 steps 6-8: for one REGISTER, every Contact is added, refreshed or removed,
with the Call-ID/CSeq ordering rule, all or nothing.

Two stores share one behaviour (and one test suite):

* :class:`MemoryBindingStore`, the embedded default: a dict of AOR -> short list of
  bindings, and a heap of (next expiry, AOR) so purging expired bindings never walks
  every AOR.
* :class:`RedisBindingStore`: several switch processes share one Redis. One hash per
  AOR (field = binding key, value = compact JSON array) whose key TTL follows its
  latest expiry, plus two sorted sets for counting, iteration and purging. The whole
  check-and-apply of a REGISTER runs server-side in a Lua script, so it is atomic
  across nodes. All keys carry the ``{loc}`` hash tag so the scripts stay in one
  cluster slot.

Time is always injected (``now``, seconds as a float, same clock as ``expires_at``).
"""

from __future__ import annotations

import heapq
import json
import math
import sys
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Binding",
    "BindingStore",
    "ContactUpdate",
    "Flow",
    "MemoryBindingStore",
    "RedisBindingStore",
    "RegistrationRejected",
    "binding_key",
    "create_store",
    "normalize_contact",
]

CSEQ_OUT_OF_ORDER = "CSeq out of order"
TOO_MANY_CONTACTS = "Too many contacts for this address-of-record"
#: q of a Contact without a q parameter, for ordering only (the stored value stays None).
DEFAULT_Q = 1.0


@dataclass(slots=True, frozen=True)
class Flow:
    """The transport flow a REGISTER arrived on (RFC 5626): how to reach the device behind NAT."""

    transport: str  # "udp" | "tcp" | "tls" | "ws" | "wss"
    remote_host: str
    remote_port: int
    local_host: str
    local_port: int
    connection_id: int | None = None


@dataclass(slots=True, frozen=True)
class Binding:
    """One registered contact of an address-of-record. Immutable: stores replace, never mutate."""

    aor: str  # canonical "user@domain"
    contact: str  # the Contact URI text, without display name or header parameters
    q: float | None
    expires_at: float  # absolute, same clock as the `now` given to the store
    call_id: str
    cseq: int
    flow: Flow
    instance_id: str | None = None  # +sip.instance
    reg_id: int | None = None
    user_agent: str | None = None
    registered_at: float = 0.0  # first REGISTER of this Call-ID that created the binding
    account_id: str | None = None
    device: str | None = None  # extension

    def expires_in(self, now: float) -> int:
        """Whole seconds left (rounded up), 0 once expired: the `expires` param of a 200 OK."""
        remaining = self.expires_at - now
        if remaining <= 0:
            return 0
        return max(1, math.ceil(remaining - 1e-6))

    def is_live(self, now: float) -> bool:
        return self.expires_at > now


@dataclass(slots=True)
class ContactUpdate:
    """One Contact of a REGISTER, already parsed by the registrar."""

    contact: str
    expires: int  # seconds; 0 removes the binding
    q: float | None = None
    instance_id: str | None = None
    reg_id: int | None = None


class RegistrationRejected(Exception):
    """The REGISTER must be refused with this status; the store was left unchanged."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


def normalize_contact(uri: str) -> str:
    """A comparison form of a Contact URI (a simplification of RFC 3261 §19.1.4).

    Scheme, host, port and URI parameters compare case-insensitively (parameters in any
    order); the user part compares exactly.
    """
    text = uri.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    scheme, colon, rest = text.partition(":")
    if not colon:
        return text.lower()
    at = rest.rfind("@")
    user, hostpart = (rest[:at], rest[at + 1 :]) if at >= 0 else ("", rest)
    hostpart, question, headers = hostpart.partition("?")
    host, *params = hostpart.lower().split(";")
    normalized = f"{scheme.lower()}:{user}@{host}" if at >= 0 else f"{scheme.lower()}:{host}"
    if params:
        normalized += ";" + ";".join(sorted(p for p in params if p))
    if question:
        normalized += "?" + headers
    return normalized


def binding_key(contact: str, instance_id: str | None, reg_id: int | None) -> str:
    """What identifies a binding within its AOR.

    With +sip.instance and reg-id (RFC 5626) the pair is the key, so a device that
    re-registers the same flow from a new address replaces its old binding; with an
    instance alone (RFC 5627) the instance is the key; otherwise the Contact URI.
    """
    if instance_id:
        instance = instance_id.strip().lower()
        return f"i:{instance}" if reg_id is None else f"i:{instance}:{reg_id}"
    return "c:" + normalize_contact(contact)


def _order(binding: Binding) -> tuple[float, float, str]:
    """q descending, then most recently registered first, then contact text."""
    q = DEFAULT_Q if binding.q is None else binding.q
    return (-q, -binding.registered_at, binding.contact)


def _sorted(bindings: Sequence[Binding]) -> list[Binding]:
    return sorted(bindings, key=_order)


class BindingStore(ABC):
    """The location service: bindings of addresses-of-record to contacts and flows."""

    @abstractmethod
    async def register(
        self,
        aor: str,
        updates: list[ContactUpdate],
        *,
        call_id: str,
        cseq: int,
        flow: Flow,
        user_agent: str | None = None,
        account_id: str | None = None,
        device: str | None = None,
        now: float,
        max_contacts: int | None = None,
    ) -> list[Binding]:
        """Apply every Contact of one REGISTER atomically (RFC 3261 §10.3 steps 6-8).

        Returns the AOR's live bindings afterwards, q descending. Raises
        :class:`RegistrationRejected` (500 CSeq out of order, 403 too many contacts)
        with nothing changed. ``max_contacts`` None or 0 means no limit; a request that
        does not raise the number of bindings is never refused for the limit.
        """

    @abstractmethod
    async def unregister_all(
        self, aor: str, *, call_id: str, cseq: int, now: float
    ) -> list[Binding]:
        """``Contact: *`` with Expires 0: remove every binding of the AOR, all or nothing.

        Returns the AOR's live bindings afterwards (always empty on success), like
        :meth:`register`, so the registrar can build its 200 OK the same way.
        """

    @abstractmethod
    async def lookup(self, aor: str, now: float) -> list[Binding]:
        """Live bindings of the AOR, q descending."""

    @abstractmethod
    async def remove(self, aor: str, contact: str) -> bool:
        """Drop the binding(s) of this Contact URI (keepalive failure). True if any."""

    @abstractmethod
    async def expire(self, now: float) -> int:
        """Purge expired bindings; returns how many were purged."""

    @abstractmethod
    async def count(self, now: float) -> int:
        """Number of live bindings."""

    @abstractmethod
    async def aor_count(self, now: float) -> int:
        """Number of AORs with at least one live binding."""

    @abstractmethod
    def iter_bindings(self, now: float) -> AsyncIterator[Binding]:
        """Every live binding (for OPTIONS keepalives); a loose snapshot."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""


def _check_cseq(live_by_key: dict[str, Binding], keys: list[str], call_id: str, cseq: int) -> None:
    for key in keys:
        existing = live_by_key.get(key)
        if existing is not None and existing.call_id == call_id and existing.cseq >= cseq:
            raise RegistrationRejected(500, CSEQ_OUT_OF_ORDER)


class MemoryBindingStore(BindingStore):
    """In-process store. Every method runs without awaiting, so each is atomic on the loop."""

    _HEAP_SLACK = 1024

    def __init__(self) -> None:
        self._by_aor: dict[str, list[Binding]] = {}
        self._binding_count = 0
        # (when, aor): purge check for `aor` due at `when`; `_due` holds the valid one.
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}

    def _replace(self, aor: str, old: list[Binding], new: list[Binding]) -> None:
        self._binding_count += len(new) - len(old)
        if not new:
            self._by_aor.pop(aor, None)
            self._due.pop(aor, None)
            return
        self._by_aor[aor] = new
        next_expiry = min(b.expires_at for b in new)
        due = self._due.get(aor)
        if due is None or next_expiry < due:
            self._due[aor] = next_expiry
            heapq.heappush(self._heap, (next_expiry, aor))
            if len(self._heap) > 2 * len(self._due) + self._HEAP_SLACK:
                self._heap = [(when, name) for name, when in self._due.items()]
                heapq.heapify(self._heap)

    async def register(
        self,
        aor: str,
        updates: list[ContactUpdate],
        *,
        call_id: str,
        cseq: int,
        flow: Flow,
        user_agent: str | None = None,
        account_id: str | None = None,
        device: str | None = None,
        now: float,
        max_contacts: int | None = None,
    ) -> list[Binding]:
        current = self._by_aor.get(aor, [])
        live_by_key = {
            binding_key(b.contact, b.instance_id, b.reg_id): b
            for b in current
            if b.expires_at > now
        }
        keys = [binding_key(u.contact, u.instance_id, u.reg_id) for u in updates]
        _check_cseq(live_by_key, keys, call_id, cseq)
        result = dict(live_by_key)
        # few distinct values across 100k bindings: share one string each
        user_agent = sys.intern(user_agent) if user_agent else user_agent
        account_id = sys.intern(account_id) if account_id else account_id
        for key, update in zip(keys, updates, strict=True):
            if update.expires <= 0:
                result.pop(key, None)
                continue
            previous = live_by_key.get(key)
            kept = previous is not None and previous.call_id == call_id
            result[key] = Binding(
                aor=aor,
                contact=update.contact,
                q=update.q,
                expires_at=now + update.expires,
                call_id=call_id,
                cseq=cseq,
                flow=flow,
                instance_id=update.instance_id,
                reg_id=update.reg_id,
                user_agent=user_agent,
                registered_at=previous.registered_at if kept and previous else now,
                account_id=account_id,
                device=device,
            )
        if max_contacts and len(result) > max_contacts and len(result) > len(live_by_key):
            raise RegistrationRejected(403, TOO_MANY_CONTACTS)
        new = _sorted(list(result.values()))
        self._replace(aor, current, new)
        return list(new)

    async def unregister_all(
        self, aor: str, *, call_id: str, cseq: int, now: float
    ) -> list[Binding]:
        current = self._by_aor.get(aor, [])
        for binding in current:
            if binding.expires_at > now and binding.call_id == call_id and binding.cseq >= cseq:
                raise RegistrationRejected(500, CSEQ_OUT_OF_ORDER)
        self._replace(aor, current, [])
        return []

    async def lookup(self, aor: str, now: float) -> list[Binding]:
        return [b for b in self._by_aor.get(aor, ()) if b.expires_at > now]

    async def remove(self, aor: str, contact: str) -> bool:
        current = self._by_aor.get(aor)
        if not current:
            return False
        target = normalize_contact(contact)
        kept = [b for b in current if normalize_contact(b.contact) != target]
        if len(kept) == len(current):
            return False
        self._replace(aor, current, kept)
        return True

    async def expire(self, now: float) -> int:
        purged = 0
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, aor = heapq.heappop(heap)
            if self._due.get(aor) != when:
                continue  # stale entry: the AOR was rescheduled or removed
            del self._due[aor]
            current = self._by_aor.get(aor, [])
            kept = [b for b in current if b.expires_at > now]
            purged += len(current) - len(kept)
            self._replace(aor, current, kept)
        return purged

    async def count(self, now: float) -> int:
        await self.expire(now)
        return self._binding_count

    async def aor_count(self, now: float) -> int:
        await self.expire(now)
        return len(self._by_aor)

    async def iter_bindings(self, now: float) -> AsyncIterator[Binding]:
        for bindings in list(self._by_aor.values()):
            for binding in bindings:
                if binding.expires_at > now:
                    yield binding

    async def close(self) -> None:
        self._by_aor.clear()
        self._heap.clear()
        self._due.clear()
        self._binding_count = 0


# --- Redis -------------------------------------------------------------------------------
#
# Hash value: compact JSON array, registered_at last so a refresh can keep it verbatim:
# [contact, q, expires_at, call_id, cseq, transport, remote_host, remote_port, local_host,
#  local_port, connection_id, instance_id, reg_id, user_agent, account_id, device,
#  registered_at]
# Sorted sets: aors (member aor, score = latest expiry), bindings (member aor NUL field,
# score = expiry).

_LUA_COMMON = r"""
local SEP = "\0"
local function decode(value)
  local ok, b = pcall(cjson.decode, value)
  if ok and type(b) == 'table' and type(b[3]) == 'number' then return b end
  return nil
end
local function num(x) return string.format('%.17g', x) end
"""

_LUA_REGISTER = r"""
-- KEYS: aor hash, aors zset, bindings zset
-- ARGV: aor, now, call_id, cseq, max_contacts (0 = none), registered_at for new bindings,
--       then per Contact: field, expires, expires_at, value without its last element
local aor, now, call_id = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local cseq, max_contacts = tonumber(ARGV[4]), tonumber(ARGV[5])
local flat = redis.call('HGETALL', KEYS[1])
local live, live_count, dead = {}, 0, {}
for i = 1, #flat, 2 do
  local b = decode(flat[i + 1])
  if b and b[3] > now then
    live[flat[i]] = {flat[i + 1], b}
    live_count = live_count + 1
  else
    dead[#dead + 1] = flat[i]
  end
end
for i = 7, #ARGV, 4 do
  local cur = live[ARGV[i]]
  if cur and cur[2][4] == call_id and tonumber(cur[2][5]) >= cseq then
    return {0, 'cseq'}
  end
end
local result = {}
for field, cur in pairs(live) do result[field] = {cur[1], cur[2][3]} end
local changed = {}
for i = 7, #ARGV, 4 do
  local field = ARGV[i]
  if tonumber(ARGV[i + 1]) <= 0 then
    result[field] = nil
    changed[field] = false
  else
    local registered_at = ARGV[6]
    local cur = live[field]
    if cur and cur[2][4] == call_id then
      local kept = string.match(cur[1], ',([^,]*)%]$')
      if kept then registered_at = kept end
    end
    local value = ARGV[i + 3] .. registered_at .. ']'
    result[field] = {value, tonumber(ARGV[i + 2])}
    changed[field] = ARGV[i + 2]
  end
end
local after = 0
for _ in pairs(result) do after = after + 1 end
if max_contacts > 0 and after > max_contacts and after > live_count then
  return {0, 'max'}
end
for _, field in ipairs(dead) do
  redis.call('HDEL', KEYS[1], field)
  redis.call('ZREM', KEYS[3], aor .. SEP .. field)
end
for field, expires_at in pairs(changed) do
  if expires_at then
    redis.call('HSET', KEYS[1], field, result[field][1])
    redis.call('ZADD', KEYS[3], expires_at, aor .. SEP .. field)
  else
    redis.call('HDEL', KEYS[1], field)
    redis.call('ZREM', KEYS[3], aor .. SEP .. field)
  end
end
local reply, latest = {1}, nil
for _, entry in pairs(result) do
  reply[#reply + 1] = entry[1]
  if latest == nil or entry[2] > latest then latest = entry[2] end
end
if latest == nil then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], aor)
else
  redis.call('ZADD', KEYS[2], num(latest), aor)
  redis.call('PEXPIRE', KEYS[1], string.format('%d', math.ceil((latest - now) * 1000)))
end
return reply
"""

_LUA_UNREGISTER_ALL = r"""
-- KEYS: aor hash, aors zset, bindings zset; ARGV: aor, now, call_id, cseq
local aor, now, call_id, cseq = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local b = decode(flat[i + 1])
  if b and b[3] > now and b[4] == call_id and tonumber(b[5]) >= cseq then
    return {0, 'cseq'}
  end
end
for i = 1, #flat, 2 do redis.call('ZREM', KEYS[3], aor .. SEP .. flat[i]) end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], aor)
return {1}
"""

_LUA_REMOVE_FIELDS = r"""
-- KEYS: aor hash, aors zset, bindings zset; ARGV: aor, then pairs of field, expected value
local aor, removed = ARGV[1], 0
for i = 2, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('ZREM', KEYS[3], aor .. SEP .. ARGV[i])
    removed = removed + 1
  end
end
if removed > 0 then
  local values, latest = redis.call('HVALS', KEYS[1]), nil
  for _, value in ipairs(values) do
    local b = decode(value)
    if b and (latest == nil or b[3] > latest) then latest = b[3] end
  end
  if latest == nil then
    redis.call('DEL', KEYS[1])
    redis.call('ZREM', KEYS[2], aor)
  else
    redis.call('ZADD', KEYS[2], num(latest), aor)
  end
end
return removed
"""

_LUA_EXPIRE = r"""
-- KEYS: aors zset, bindings zset; ARGV: now, batch size, aor hash key prefix
local now, batch, prefix = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local members = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, batch)
for _, member in ipairs(members) do
  local cut = string.find(member, SEP, 1, true)
  if cut then
    redis.call('HDEL', prefix .. string.sub(member, 1, cut - 1), string.sub(member, cut + 1))
  end
  redis.call('ZREM', KEYS[2], member)
end
local aors = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, batch)
for _, aor in ipairs(aors) do
  redis.call('DEL', prefix .. aor)
  redis.call('ZREM', KEYS[1], aor)
end
return {#members, #aors}
"""


class RedisBindingStore(BindingStore):
    """Bindings in Redis, shared by every switch process pointed at it."""

    EXPIRE_BATCH = 500
    _MAX_EXPIRE_ROUNDS = 100_000

    def __init__(self, redis_url: str, key_prefix: str = "softswitch:") -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        self._aor_prefix = f"{key_prefix}{{loc}}:aor:"
        self._aors_key = f"{key_prefix}{{loc}}:aors"
        self._bindings_key = f"{key_prefix}{{loc}}:bindings"
        self._register_script = self._redis.register_script(_LUA_COMMON + _LUA_REGISTER)
        self._unregister_script = self._redis.register_script(_LUA_COMMON + _LUA_UNREGISTER_ALL)
        self._remove_script = self._redis.register_script(_LUA_COMMON + _LUA_REMOVE_FIELDS)
        self._expire_script = self._redis.register_script(_LUA_COMMON + _LUA_EXPIRE)

    @property
    def redis(self) -> Any:
        """The underlying ``redis.asyncio`` client (for tests and admin tools)."""
        return self._redis

    def aor_key(self, aor: str) -> str:
        return self._aor_prefix + aor

    def _keys(self, aor: str) -> list[str]:
        return [self.aor_key(aor), self._aors_key, self._bindings_key]

    @staticmethod
    def _encode_without_registered_at(
        update: ContactUpdate,
        expires_at: float,
        call_id: str,
        cseq: int,
        flow: Flow,
        user_agent: str | None,
        account_id: str | None,
        device: str | None,
    ) -> str:
        fields = [
            update.contact, update.q, expires_at, call_id, cseq,
            flow.transport, flow.remote_host, flow.remote_port, flow.local_host,
            flow.local_port, flow.connection_id,
            update.instance_id, update.reg_id, user_agent, account_id, device,
        ]  # fmt: skip
        return json.dumps(fields, separators=(",", ":"))[:-1] + ","

    @staticmethod
    def _decode(aor: str, value: str) -> Binding | None:
        try:
            f = json.loads(value)
            return Binding(
                aor=aor,
                contact=f[0],
                q=None if f[1] is None else float(f[1]),
                expires_at=float(f[2]),
                call_id=f[3],
                cseq=int(f[4]),
                flow=Flow(f[5], f[6], int(f[7]), f[8], int(f[9]), f[10]),
                instance_id=f[11],
                reg_id=f[12],
                user_agent=f[13],
                account_id=f[14],
                device=f[15],
                registered_at=float(f[16]),
            )
        except (ValueError, TypeError, IndexError, KeyError):
            return None  # a foreign or corrupt value is never a binding

    def _decode_all(self, aor: str, values: Sequence[str], now: float) -> list[Binding]:
        bindings = [self._decode(aor, value) for value in values]
        return _sorted([b for b in bindings if b is not None and b.expires_at > now])

    async def register(
        self,
        aor: str,
        updates: list[ContactUpdate],
        *,
        call_id: str,
        cseq: int,
        flow: Flow,
        user_agent: str | None = None,
        account_id: str | None = None,
        device: str | None = None,
        now: float,
        max_contacts: int | None = None,
    ) -> list[Binding]:
        args: list[str | int] = [aor, repr(float(now)), call_id, int(cseq)]
        args += [int(max_contacts or 0), repr(float(now))]
        for update in updates:
            expires_at = float(now + max(update.expires, 0))
            args += [
                binding_key(update.contact, update.instance_id, update.reg_id),
                int(update.expires),
                repr(expires_at),
                self._encode_without_registered_at(
                    update, expires_at, call_id, cseq, flow, user_agent, account_id, device
                ),
            ]
        reply = await self._run_refusable(self._register_script, aor, args)
        return self._decode_all(aor, reply[1:], now)

    async def _run_refusable(self, script: Any, aor: str, args: list[Any]) -> list[Any]:
        """Run a check-and-apply script; a refusal or an unreachable Redis is a rejection."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        try:
            reply = await script(keys=self._keys(aor), args=args)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise RegistrationRejected(503, "Location service unavailable") from exc
        if int(reply[0]) == 1:
            return list(reply)
        if reply[1] == "max":
            raise RegistrationRejected(403, TOO_MANY_CONTACTS)
        raise RegistrationRejected(500, CSEQ_OUT_OF_ORDER)

    async def unregister_all(
        self, aor: str, *, call_id: str, cseq: int, now: float
    ) -> list[Binding]:
        args = [aor, repr(float(now)), call_id, int(cseq)]
        await self._run_refusable(self._unregister_script, aor, args)
        return []

    async def lookup(self, aor: str, now: float) -> list[Binding]:
        values = await self._redis.hvals(self.aor_key(aor))
        return self._decode_all(aor, values, now)

    async def remove(self, aor: str, contact: str) -> bool:
        target = normalize_contact(contact)
        stored = await self._redis.hgetall(self.aor_key(aor))
        args: list[str] = [aor]
        for field, value in stored.items():
            binding = self._decode(aor, value)
            if binding is not None and normalize_contact(binding.contact) == target:
                args += [field, value]
        if len(args) == 1:
            return False
        removed = await self._remove_script(keys=self._keys(aor), args=args)
        return int(removed) > 0

    async def expire(self, now: float) -> int:
        purged = 0
        keys = [self._aors_key, self._bindings_key]
        args = [repr(float(now)), self.EXPIRE_BATCH, self._aor_prefix]
        for _ in range(self._MAX_EXPIRE_ROUNDS):
            bindings_done, aors_done = await self._expire_script(keys=keys, args=args)
            purged += int(bindings_done)
            if int(bindings_done) < self.EXPIRE_BATCH and int(aors_done) < self.EXPIRE_BATCH:
                break
        return purged

    async def count(self, now: float) -> int:
        return int(await self._redis.zcount(self._bindings_key, f"({now!r}", "+inf"))

    async def aor_count(self, now: float) -> int:
        return int(await self._redis.zcount(self._aors_key, f"({now!r}", "+inf"))

    async def iter_bindings(self, now: float) -> AsyncIterator[Binding]:
        batch: list[str] = []
        async for aor, latest in self._redis.zscan_iter(self._aors_key, count=500):
            if latest > now:
                batch.append(aor)
            if len(batch) >= 200:
                for binding in await self._fetch(batch, now):
                    yield binding
                batch = []
        for binding in await self._fetch(batch, now):
            yield binding

    async def _fetch(self, aors: list[str], now: float) -> list[Binding]:
        if not aors:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for aor in aors:
                pipe.hvals(self.aor_key(aor))
            replies = await pipe.execute()
        found: list[Binding] = []
        for aor, values in zip(aors, replies, strict=True):
            found += self._decode_all(aor, values, now)
        return found

    async def close(self) -> None:
        await self._redis.aclose()


def create_store(
    backend: str, redis_url: str = "", key_prefix: str = "softswitch:"
) -> BindingStore:
    """The location store named by the settings: ``memory`` (default) or ``redis``."""
    name = backend.strip().lower()
    if name == "memory":
        return MemoryBindingStore()
    if name == "redis":
        if not redis_url:
            raise ValueError("the redis location backend needs a redis_url")
        return RedisBindingStore(redis_url, key_prefix)
    raise ValueError(f"unknown location backend {backend!r} (expected 'memory' or 'redis')")
