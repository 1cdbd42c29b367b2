"""Who may see what: credentials, the rights policy and signed URL tokens.

Pure logic, no FastAPI: `tiler.access` wraps it in middleware and dependencies.

* A **policy** maps groups to collections (glob patterns), with the operations
  allowed (``tiles``, ``preview``, ``metadata``, ``data``) and optional limits
  (``max_zoom`` in WebMercatorQuad levels, ``max_preview_size`` in pixels).
  Groups granted to anonymous callers are listed under ``anonymous``.
* A caller's **groups** come from a JWT claim (RS256/ES256, checked against the
  identity provider's JWKS) or from an API key's record.
* A **URL token** (``dt1.<payload>.<hmac>``) is minted by an authenticated
  caller for QGIS and web maps: it carries the user, groups and a scope
  (collections or one search, max zoom) and expires. What it grants is always
  the intersection of its scope and what the policy gives its groups *now*.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

OPERATIONS = frozenset({"tiles", "preview", "metadata", "data"})
DEFAULT_PREVIEW_SIZE = 1024  # titiler's default preview max_size
TOKEN_PREFIX = "dt1"
MAX_TOKEN_LENGTH = 2048


class AuthError(Exception):
    """Base class of credential and policy errors."""


class InvalidCredentials(AuthError):
    """A credential was given but is malformed, forged, expired or revoked (401)."""


class PolicyError(AuthError):
    """The policy or key file is invalid (a configuration error)."""


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class Access:
    """What a caller may do on one collection: each allowed operation and its limit.

    The limit of ``tiles`` is a max zoom (WebMercatorQuad levels), that of
    ``preview`` a max size in pixels; ``metadata`` and ``data`` have none.
    Limits are per operation, so a group that may only see thumbnails never
    lifts the zoom limit another group puts on tiles.
    """

    ops: Mapping[str, int | None]

    @property
    def operations(self) -> frozenset[str]:
        """The allowed operations."""
        return frozenset(self.ops)

    @property
    def max_zoom(self) -> int | None:
        """Highest tile zoom (None: no limit)."""
        return self.ops.get("tiles")

    @property
    def max_preview_size(self) -> int | None:
        """Largest preview side in pixels (None: no limit)."""
        return self.ops.get("preview")

    def merge(self, other: Access) -> Access:
        """Union of two grants: every operation of either, with the wider limit."""
        out = dict(self.ops)
        for op, lim in other.ops.items():
            if op not in out:
                out[op] = lim
            else:
                mine = out[op]
                out[op] = None if mine is None or lim is None else max(mine, lim)
        return Access(out)

    def restrict(self, max_zoom: int | None) -> Access:
        """Narrow to a URL token's ``max_zoom`` scope, as the policy does for a grant with one.

        A zoom limit means nothing if full resolution can be had another way: the scoped
        access loses ``data`` (point, bbox, feature, statistics, raw file streaming) and
        its previews are capped at `DEFAULT_PREVIEW_SIZE` px (or the grant's own, smaller cap).
        """
        if max_zoom is None:
            return self
        ops = {op: lim for op, lim in self.ops.items() if op != "data"}
        if "tiles" in ops:
            cur = ops["tiles"]
            ops["tiles"] = max_zoom if cur is None else min(cur, max_zoom)
        if "preview" in ops:
            cur = ops["preview"]
            ops["preview"] = DEFAULT_PREVIEW_SIZE if cur is None else min(cur, DEFAULT_PREVIEW_SIZE)
        return Access(ops)

    def allows(self, operation: str) -> bool:
        """True when ``operation`` is granted."""
        return operation in self.ops


@dataclass(frozen=True)
class Grant:
    """One entry of a group: collection patterns and what they allow."""

    collections: tuple[str, ...]
    access: Access

    def matches(self, collection_id: str) -> bool:
        """True when the collection id matches one of the patterns."""
        return any(fnmatch.fnmatchcase(collection_id, p) for p in self.collections)


def _parse_grant(group: str, raw: Any) -> Grant:
    where = f"group {group!r}"
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: each grant must be a mapping")
    unknown = set(raw) - {"collections", "operations", "max_zoom", "max_preview_size"}
    if unknown:
        raise PolicyError(f"{where}: unknown keys {sorted(unknown)}")
    cols = raw.get("collections")
    if isinstance(cols, str):
        cols = [cols]
    if not cols or not all(isinstance(c, str) and c for c in cols):
        raise PolicyError(f"{where}: `collections` must be a non-empty list of ids or glob patterns")
    default_ops = sorted(OPERATIONS - {"data"}) if raw.get("max_zoom") is not None else sorted(OPERATIONS)
    ops = raw.get("operations", default_ops)
    if isinstance(ops, str):
        ops = [ops]
    bad = set(ops) - OPERATIONS
    if bad:
        raise PolicyError(f"{where}: unknown operations {sorted(bad)} (allowed: {sorted(OPERATIONS)})")
    max_zoom = raw.get("max_zoom")
    if max_zoom is not None and (not isinstance(max_zoom, int) or not 0 <= max_zoom <= 30):
        raise PolicyError(f"{where}: `max_zoom` must be an integer 0-30")
    mps = raw.get("max_preview_size")
    if mps is not None and (not isinstance(mps, int) or mps < 1):
        raise PolicyError(f"{where}: `max_preview_size` must be a positive integer")
    if max_zoom is not None:
        if "data" in ops:
            raise PolicyError(
                f"{where}: a grant limited by `max_zoom` cannot include `data` "
                "(point, bbox, feature and statistics read full resolution)"
            )
        if mps is None:
            mps = DEFAULT_PREVIEW_SIZE  # else a preview could be as sharp as the source
    limits = {"tiles": max_zoom, "preview": mps}
    return Grant(tuple(cols), Access({op: limits.get(op) for op in ops}))


@dataclass(frozen=True)
class Policy:
    """Groups -> grants, and the groups anonymous callers get."""

    groups: Mapping[str, tuple[Grant, ...]]
    anonymous: tuple[str, ...] = ()
    cog_groups: tuple[str, ...] = ()
    catalogue_groups: tuple[str, ...] = ()

    @classmethod
    def from_mapping(cls, doc: Any) -> Policy:
        """Validate a parsed policy document.

        Format::

            groups:
              dinamis-research:            # group name, as in the JWT claim / key record
                - collections: ["spot67-*", "pleiades-*"]
              spot-thumbnails:
                - collections: [spot67-demo]
                  operations: [preview, metadata]
                  max_preview_size: 512
            anonymous: [spot-thumbnails]    # groups granted to callers without credentials
            cog: [admins]                   # groups allowed on /cog?url= (when enabled)
            catalogues: [metacatalogue]     # groups allowed on /external?url= (when enabled)

        A group listed under ``catalogues`` need not have collection grants; ``anonymous`` may
        name it (anonymous callers then use ``/external``).
        """
        if not isinstance(doc, Mapping):
            raise PolicyError("policy must be a mapping with a `groups` key")
        unknown = set(doc) - {"groups", "anonymous", "cog", "catalogues"}
        if unknown:
            raise PolicyError(f"policy: unknown keys {sorted(unknown)}")
        raw_groups = doc.get("groups") or {}
        if not isinstance(raw_groups, Mapping):
            raise PolicyError("policy: `groups` must be a mapping of group name -> grants")
        groups: dict[str, tuple[Grant, ...]] = {}
        for name, grants in raw_groups.items():
            if isinstance(grants, Mapping):
                grants = [grants]
            if not isinstance(grants, list):
                raise PolicyError(f"group {name!r}: grants must be a list")
            groups[str(name)] = tuple(_parse_grant(str(name), g) for g in grants)
        anonymous = tuple(doc.get("anonymous") or ())
        cog = tuple(doc.get("cog") or ())
        catalogues = doc.get("catalogues") or ()
        if isinstance(catalogues, str) or not all(isinstance(g, str) and g for g in catalogues):
            raise PolicyError("policy: `catalogues` must be a list of group names")
        catalogues = tuple(catalogues)
        missing = [g for g in anonymous if g not in groups and g not in catalogues]
        if missing:
            raise PolicyError(f"policy: `anonymous` names undefined groups {missing}")
        return cls(groups=groups, anonymous=anonymous, cog_groups=cog, catalogue_groups=catalogues)

    def access(self, groups: Iterable[str], collection_id: str) -> Access | None:
        """Merged access of ``groups`` to ``collection_id`` (None: no access)."""
        out: Access | None = None
        for g in groups:
            for grant in self.groups.get(g, ()):
                if grant.matches(collection_id):
                    out = grant.access if out is None else out.merge(grant.access)
        return out


def load_document(path: str | Path) -> Any:
    """Parse a YAML or JSON file (JSON is YAML)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PolicyError(f"{Path(path).name}: not valid YAML/JSON ({e.__class__.__name__})") from e


class ReloadingFile:
    """A parsed file re-read when its modification time changes.

    Checked at most every ``interval`` seconds; a broken edit keeps the last
    good version (and logs why), so a typo never opens or closes everything.
    """

    def __init__(self, path: str | Path, parse: Callable[[Any], Any], interval: float = 2.0):
        """Load ``path`` now; raise PolicyError when it is invalid."""
        self.path = Path(path)
        self._parse = parse
        self._interval = interval
        self._lock = threading.Lock()
        self._stamp = self._mtime()
        self._value = parse(load_document(self.path))
        self._checked = time.monotonic()

    def _mtime(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size)

    def get(self) -> Any:
        """The current value, reloading first if the file changed."""
        now = time.monotonic()
        if now - self._checked < self._interval:
            return self._value
        with self._lock:
            if now - self._checked < self._interval:
                return self._value
            self._checked = now
            try:
                stamp = self._mtime()
                if stamp != self._stamp:
                    value = self._parse(load_document(self.path))
                    self._value, self._stamp = value, stamp
                    logger.info("reloaded %s", self.path.name)
            except (OSError, PolicyError) as e:
                logger.error("keeping the previous %s: %s", self.path.name, e)
        return self._value


# --------------------------------------------------------------------------- principals


@dataclass(frozen=True)
class UrlToken:
    """The verified payload of a signed URL token."""

    jti: str
    sub: str
    groups: tuple[str, ...]
    exp: int
    iat: int
    kid: str
    collections: tuple[str, ...] | None = None
    search: str | None = None
    max_zoom: int | None = None
    #: one item (its id; ``collections`` then names its collection): asset links of the STAC API
    item: str | None = None
    #: id of the URL token this one was derived from (revoking that one revokes this one)
    parent: str | None = None


@dataclass(frozen=True)
class Principal:
    """The caller of one request."""

    user: str | None
    groups: frozenset[str] = frozenset()
    method: str = "anonymous"  # anonymous | jwt | apikey | url-token
    token: UrlToken | None = None

    @property
    def anonymous(self) -> bool:
        """True when no credential was presented."""
        return self.user is None

    def access(self, policy: Policy, collection_id: str) -> Access | None:
        """What this caller may do on ``collection_id`` now (None: nothing)."""
        tok = self.token
        if tok is not None and tok.collections is not None:
            if not any(fnmatch.fnmatchcase(collection_id, p) for p in tok.collections):
                return None
        groups = set(policy.anonymous) | set(self.groups)
        acc = policy.access(groups, collection_id)
        if acc is None or tok is None:
            return acc
        return acc.restrict(tok.max_zoom)

    def may_use_cog(self, policy: Policy) -> bool:
        """True when a group of this caller is listed under the policy's `cog`."""
        return not self.anonymous and bool(set(self.groups) & set(policy.cog_groups)) and self.token is None

    def may_use_catalogues(self, policy: Policy) -> bool:
        """True when a group of this caller (or of anonymous callers) is listed under the policy's `catalogues`.

        A URL token scoped to collections, a search, an item or a zoom level is not: its scope
        names the pgstac data it was minted for.
        """
        tok = self.token
        if tok is not None and (
            tok.collections is not None
            or tok.search is not None
            or tok.item is not None
            or tok.max_zoom is not None
        ):
            return False
        return bool((set(self.groups) | set(policy.anonymous)) & set(policy.catalogue_groups))


ANONYMOUS = Principal(user=None)


# --------------------------------------------------------------------------- URL tokens


def _b64e(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")


def _b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _sign(secret: bytes, signed_part: str) -> str:
    return _b64e(hmac.new(secret, signed_part.encode("ascii"), hashlib.sha256).digest())


def looks_like_url_token(value: str) -> bool:
    """True for strings of our URL-token shape (not proof of validity)."""
    return value.startswith(TOKEN_PREFIX + ".") and value.count(".") == 2


def mint_url_token(
    keys: Mapping[str, bytes],
    *,
    sub: str,
    groups: Iterable[str],
    ttl: int,
    collections: Iterable[str] | None = None,
    search: str | None = None,
    max_zoom: int | None = None,
    item: str | None = None,
    parent: str | None = None,
    now: float | None = None,
    exp: int | None = None,
) -> tuple[str, UrlToken]:
    """Sign a new URL token with the first key of ``keys``."""
    if not keys:
        raise AuthError("no signing key configured")
    kid, secret = next(iter(keys.items()))
    iat = int(now if now is not None else time.time())
    expires = iat + int(ttl) if exp is None else min(int(exp), iat + int(ttl))
    payload: dict[str, Any] = {"k": kid, "u": sub, "g": sorted(set(groups)), "i": iat, "e": expires}
    payload["j"] = _b64e(secrets.token_bytes(9))
    if collections is not None:
        payload["c"] = sorted(set(collections))
    if search is not None:
        payload["s"] = search
    if max_zoom is not None:
        payload["z"] = int(max_zoom)
    if item is not None:
        payload["it"] = item
    if parent is not None:
        payload["p"] = parent
    body = _b64e(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    head = f"{TOKEN_PREFIX}.{body}"
    token = f"{head}.{_sign(secret, head)}"
    return token, _to_token(payload)


def _to_token(p: Mapping[str, Any]) -> UrlToken:
    return UrlToken(
        jti=str(p["j"]),
        sub=str(p["u"]),
        groups=tuple(str(g) for g in p.get("g", ())),
        exp=int(p["e"]),
        iat=int(p["i"]),
        kid=str(p["k"]),
        collections=tuple(p["c"]) if "c" in p else None,
        search=p.get("s"),
        max_zoom=p.get("z"),
        item=p.get("it"),
        parent=p.get("p"),
    )


def verify_url_token(
    token: str,
    keys: Mapping[str, bytes],
    revoked: Callable[[str], bool] = lambda jti: False,
    now: float | None = None,
) -> UrlToken:
    """Check signature, key id, expiry and revocation; return the payload.

    Raises:
        InvalidCredentials: with a message safe to show (never the token).

    """
    if len(token) > MAX_TOKEN_LENGTH or not looks_like_url_token(token):
        raise InvalidCredentials("Malformed URL token")
    prefix, body, sig = token.split(".")
    try:
        payload = json.loads(_b64d(body))
        kid = payload["k"]
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidCredentials("Malformed URL token") from e
    secret = keys.get(kid) if isinstance(kid, str) else None
    if secret is None:
        raise InvalidCredentials("URL token signed with an unknown or retired key")
    if not hmac.compare_digest(_sign(secret, f"{prefix}.{body}"), sig):
        raise InvalidCredentials("URL token signature does not match")
    try:
        tok = _to_token(payload)
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidCredentials("Malformed URL token") from e
    if tok.exp <= (now if now is not None else time.time()):
        raise InvalidCredentials("URL token has expired")
    if revoked(tok.jti) or (tok.parent is not None and revoked(tok.parent)):
        raise InvalidCredentials("URL token has been revoked")
    return tok


# --------------------------------------------------------------------------- API keys


def hash_api_key(key: str) -> str:
    """SHA-256 hex digest stored in the key file instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key() -> str:
    """A fresh random API key (``dtk_`` + 32 bytes, URL-safe)."""
    return "dtk_" + _b64e(secrets.token_bytes(32))


@dataclass(frozen=True)
class ApiKeyStore:
    """API key records by SHA-256 of the key."""

    records: Mapping[str, Principal] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, doc: Any) -> ApiKeyStore:
        """Format: ``keys: [{id, sha256, user, groups}]`` (the key itself is never stored)."""
        if not isinstance(doc, Mapping) or not isinstance(doc.get("keys", []), list):
            raise PolicyError("API key file must be a mapping with a `keys` list")
        out: dict[str, Principal] = {}
        for i, rec in enumerate(doc.get("keys") or []):
            if not isinstance(rec, Mapping):
                raise PolicyError(f"API key #{i}: must be a mapping")
            digest = str(rec.get("sha256", "")).lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise PolicyError(f"API key #{i}: `sha256` must be 64 hex digits")
            user = rec.get("user")
            if not user:
                raise PolicyError(f"API key #{i}: `user` is required")
            if rec.get("disabled"):
                continue
            out[digest] = Principal(
                user=str(user), groups=frozenset(map(str, rec.get("groups") or ())), method="apikey"
            )
        return cls(out)

    def lookup(self, key: str) -> Principal:
        """The principal of ``key``; InvalidCredentials when unknown."""
        p = self.records.get(hash_api_key(key))
        if p is None:
            raise InvalidCredentials("Unknown API key")
        return p


# --------------------------------------------------------------------------- JWT


JWT_ALGORITHMS = ["RS256", "ES256"]


def _claim(claims: Mapping[str, Any], dotted: str) -> Any:
    cur: Any = claims
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


class JwtVerifier:
    """Verify RS256/ES256 JWTs against a JWKS (file or URL)."""

    def __init__(
        self,
        *,
        jwks: Mapping[str, Any] | None = None,
        jwks_url: str | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        user_claim: str = "sub",
        groups_claim: str = "groups",
    ):
        """Build from a parsed JWKS or a JWKS URL."""
        import jwt

        self._jwt = jwt
        self.issuer, self.audience = issuer, audience
        self.user_claim, self.groups_claim = user_claim, groups_claim
        self._client = None
        self._keys: dict[str | None, Any] = {}
        if jwks is not None:
            try:
                keyset = jwt.PyJWKSet.from_dict(dict(jwks))
            except jwt.PyJWTError as e:
                raise PolicyError(f"invalid JWKS: {e}") from e
            for k in keyset.keys:
                self._keys[k.key_id] = k
        elif jwks_url:
            self._client = jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=600, timeout=5)
        else:
            raise PolicyError("a JWKS file or URL is needed to verify JWTs")

    def _key(self, token: str) -> Any:
        jwt = self._jwt
        if self._client is not None:
            try:
                return self._client.get_signing_key_from_jwt(token)
            except jwt.PyJWKClientConnectionError as e:
                raise AuthError("identity provider keys unavailable") from e
            except jwt.PyJWTError as e:
                raise InvalidCredentials("JWT signed with an unknown key") from e
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as e:
            raise InvalidCredentials("Malformed JWT") from e
        key = self._keys.get(kid) or (
            next(iter(self._keys.values())) if kid is None and len(self._keys) == 1 else None
        )
        if key is None:
            raise InvalidCredentials("JWT signed with an unknown key")
        return key

    def verify(self, token: str) -> Principal:
        """Return the principal of a valid JWT; InvalidCredentials otherwise."""
        jwt = self._jwt
        key = self._key(token)
        options = {
            "require": ["exp", "iat"] + (["iss"] if self.issuer else []) + (["aud"] if self.audience else [])
        }
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=JWT_ALGORITHMS,
                issuer=self.issuer,
                audience=self.audience,
                options=options,
                leeway=30,
            )
        except jwt.ExpiredSignatureError as e:
            raise InvalidCredentials("JWT has expired") from e
        except jwt.PyJWTError as e:
            raise InvalidCredentials(f"JWT rejected: {e.__class__.__name__}") from e
        user = _claim(claims, self.user_claim)
        if not user:
            raise InvalidCredentials(f"JWT has no `{self.user_claim}` claim")
        groups = _claim(claims, self.groups_claim) or []
        if isinstance(groups, str):
            groups = groups.split()
        return Principal(user=str(user), groups=frozenset(map(str, groups)), method="jwt")
