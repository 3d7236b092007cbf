"""Tenants (``serve --keys FILE``): who is calling, which models they may use, how much they may
take, and what matters more when there is not enough.

The keys file (TOML), re-read when it changes; a file that does not parse keeps the previous keys in
force, with the error in the log::

    [tenants.vision]
    keys = ["sha256:9f86d081884c7d65..."]    # `modelport keys new vision` makes a key and this line
    models = ["flowers", "efficientnet-lite0"]  # or ["*"]: every model
    requests_per_s = 20                       # the quota: a token bucket of this rate...
    burst = 40                                # ...and this depth (default: one second's worth)
    max_in_flight = 8                         # at most this many at once
    priority = "high"                         # high | normal | batch (default normal)

Only digests are stored (SHA-256 of the key: keys are random, 256 bits, so a slow hash would add
nothing); an offered key is hashed and compared with every digest in constant time, with no early
exit, so the time taken says nothing about how much of a key matched. No key, or a wrong one, is
401; a model outside the tenant's list is 403 whether or not it exists, so neither reveals which
models there are. Over quota is 429 with ``Retry-After`` from the bucket, answered before the body
is read. In a cluster each worker enforces its share: the quota divided by the live workers it sees
in the member directory, so that the fleet's rate holds.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import secrets
import time
import tomllib
from dataclasses import dataclass, field
from typing import Callable

from modelport.engine.priority import Priority
from modelport.errors import BadInput, Forbidden, QuotaExceeded, Unauthorized

logger = logging.getLogger("modelport.tenants")

DIGEST_PREFIX = "sha256:"
_MAX_KEY_CHARS = 512
_CHECK_EVERY_S = 1.0  # how often the file's modification time is looked at
_FIELDS = {"keys", "models", "requests_per_s", "burst", "max_in_flight", "priority"}


def new_key() -> tuple[str, str]:
    """A fresh API key and the digest line that goes in the keys file."""
    key = "mpk_" + secrets.token_urlsafe(32)
    return key, digest_of(key)


def digest_of(key: str) -> str:
    return DIGEST_PREFIX + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    digests: tuple[bytes, ...]
    models: frozenset[str] | None = None  # None: every model
    requests_per_s: float | None = None  # None: no rate limit
    burst: float = 1.0
    max_in_flight: int | None = None
    priority: Priority = Priority.NORMAL

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


def parse(text: str) -> dict[str, Tenant]:
    """The tenants in a keys file's text; ``ValueError`` naming what is wrong."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not TOML: {exc}") from None
    if set(document) - {"tenants"} or not isinstance(document.get("tenants"), dict):
        raise ValueError("expected [tenants.<name>] tables and nothing else")
    tenants, seen = {}, set()
    for name, entry in document["tenants"].items():
        where = f"tenant {name!r}"
        if not isinstance(entry, dict) or set(entry) - _FIELDS:
            raise ValueError(f"{where}: unknown settings {sorted(set(entry) - _FIELDS) if isinstance(entry, dict) else entry}")
        keys = entry.get("keys")
        if not isinstance(keys, list) or not keys or not all(_is_digest(k) for k in keys):
            raise ValueError(f"{where}: keys must be a list of {DIGEST_PREFIX}<64 hex digits> (`modelport keys new`)")
        digests = tuple(bytes.fromhex(k[len(DIGEST_PREFIX):]) for k in keys)
        if seen & set(digests):
            raise ValueError(f"{where}: a key of another tenant")
        seen |= set(digests)
        models = entry.get("models", ["*"])
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
            raise ValueError(f"{where}: models must be a list of model names, or [\"*\"]")
        rate, burst, in_flight = entry.get("requests_per_s"), entry.get("burst"), entry.get("max_in_flight")
        for setting, value in (("requests_per_s", rate), ("burst", burst), ("max_in_flight", in_flight)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"{where}: {setting} must be a positive number")
        if in_flight is not None and not isinstance(in_flight, int):
            raise ValueError(f"{where}: max_in_flight must be a whole number")
        try:
            priority = Priority(entry.get("priority", "normal"))
        except ValueError:
            raise ValueError(f"{where}: priority must be one of {', '.join(p.value for p in Priority)}") from None
        tenants[name] = Tenant(name, digests, None if "*" in models else frozenset(models), rate,
                               float(burst if burst is not None else max(1.0, rate or 1.0)), in_flight, priority)
    return tenants


def _is_digest(value) -> bool:
    if not isinstance(value, str) or not value.startswith(DIGEST_PREFIX) or len(value) != len(DIGEST_PREFIX) + 64:
        return False
    try:
        bytes.fromhex(value[len(DIGEST_PREFIX):])
    except ValueError:
        return False
    return True


@dataclass
class _Usage:
    """One tenant's quota at work on this server: its token bucket and its requests in flight."""

    tokens: float
    stamp: float = field(default_factory=time.monotonic)
    in_flight: int = 0


class Tenants:
    """The tenants of one server, their keys kept in step with the file, and their quotas."""

    def __init__(self, path: str, *, share: Callable[[], int] = lambda: 1) -> None:
        self.path = path
        self._share = share  # live workers in the cluster: each enforces quota / share
        self._checked = 0.0
        self._signature: tuple[float, int] | None = None
        self._usage: dict[str, _Usage] = {}
        self.tenants: dict[str, Tenant] = {}
        try:
            self.tenants = parse(self._read())
        except (OSError, ValueError) as exc:
            raise BadInput(f"keys file {path}: {exc}") from None
        logger.info("keys file %s: %d tenant(s)", path, len(self.tenants))

    def refresh(self, now: float | None = None) -> None:
        """Re-read the file if it changed (looked at most once a second)."""
        now = time.monotonic() if now is None else now
        if now - self._checked < _CHECK_EVERY_S:
            return
        self._checked = now
        try:
            stat = os.stat(self.path)
        except OSError as exc:
            logger.error("keys file %s: %s; the previous keys stay in force", self.path, exc.strerror)
            return
        if (stat.st_mtime, stat.st_size) == self._signature:
            return
        try:
            tenants = parse(self._read())
        except (OSError, ValueError) as exc:
            self._signature = (stat.st_mtime, stat.st_size)  # logged once per change, not per second
            logger.error("keys file %s: %s; the previous keys stay in force", self.path, exc)
            return
        self.tenants = tenants
        self._usage = {name: usage for name, usage in self._usage.items() if name in tenants}
        logger.info("keys file %s re-read: %d tenant(s)", self.path, len(tenants))

    def identify(self, authorization: str | None) -> Tenant:
        """The tenant whose key is offered as ``Bearer <key>`` (HTTP header, gRPC metadata); 401
        for none or a wrong one."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("an API key is needed: Authorization: Bearer <key>")
        return self.identify_key(key.strip())

    def identify_key(self, key) -> Tenant:
        """The tenant whose key this is (a ZeroMQ request's ``key`` field); 401 for none or a wrong one."""
        self.refresh()
        if not isinstance(key, str) or not key:
            raise Unauthorized("an API key is needed (the request's key field)")
        if len(key) > _MAX_KEY_CHARS:
            raise Unauthorized("the API key is not valid")
        offered = hashlib.sha256(key.encode(errors="surrogatepass")).digest()
        found = None
        for tenant in self.tenants.values():  # every digest, every time: no early exit
            for digest in tenant.digests:
                if hmac.compare_digest(digest, offered):
                    found = tenant
        if found is None:
            raise Unauthorized("the API key is not valid")
        return found

    def check_model(self, tenant: Tenant, model: str) -> None:
        """403 for a model outside the tenant's list, whether or not it exists here."""
        if not tenant.may_use(model):
            raise Forbidden(f"tenant {tenant.name!r} may not use model {model!r}")

    def admit(self, tenant: Tenant) -> "Grant":
        """Take one request from the tenant's quota, or 429 with the time until it allows one."""
        usage = self._usage.get(tenant.name)
        share = max(1, self._share())
        now = time.monotonic()
        if usage is None:
            usage = self._usage[tenant.name] = _Usage(tokens=self._depth(tenant, share), stamp=now)
        if tenant.max_in_flight is not None:
            limit = max(1, math.ceil(tenant.max_in_flight / share))
            if usage.in_flight >= limit:
                raise QuotaExceeded(f"tenant {tenant.name!r} has {usage.in_flight} requests in flight here, its "
                                    f"limit", retry_after_s=1)
        if tenant.requests_per_s is not None:
            rate = tenant.requests_per_s / share
            usage.tokens = min(self._depth(tenant, share), usage.tokens + (now - usage.stamp) * rate)
            usage.stamp = now
            if usage.tokens < 1:
                raise QuotaExceeded(f"tenant {tenant.name!r} is over its quota of {tenant.requests_per_s:g} requests/s",
                                    retry_after_s=(1 - usage.tokens) / rate)
            usage.tokens -= 1
        usage.in_flight += 1
        return Grant(usage)

    def in_flight(self, name: str) -> int:
        usage = self._usage.get(name)
        return usage.in_flight if usage is not None else 0

    @staticmethod
    def _depth(tenant: Tenant, share: int) -> float:
        return max(1.0, tenant.burst / share)

    def _read(self) -> str:
        stat = os.stat(self.path)
        with open(self.path, encoding="utf-8") as file:
            text = file.read()
        self._signature = (stat.st_mtime, stat.st_size)
        return text


class Grant:
    """A request admitted under a tenant's quota: released (once) when it is answered."""

    def __init__(self, usage: _Usage) -> None:
        self._usage = usage
        self._open = True

    def release(self) -> None:
        if self._open:
            self._open = False
            self._usage.in_flight -= 1
