"""API keys: who may call the server, for what, and how much.

Two scopes. An *inference* key may call the model endpoints (chat, completions, embeddings, models); an *admin*
key may also manage the server (add and remove models, downloads, and whatever a plugin marks as admin).

Where keys come from
    * The environment, for simple setups: ``GALLAMA_API_KEYS`` (comma separated) are inference keys for every
      model, without quotas; ``GALLAMA_ADMIN_KEY`` is an admin key. Their ids are ``env:GALLAMA_API_KEYS[0]``,
      ``env:GALLAMA_API_KEYS[1]``, … and ``env:GALLAMA_ADMIN_KEY``.
    * The key file ``GALLAMA_HOME_PATH/keys.json``, managed with ``gallama keys add|list|revoke``. It is JSON
      rather than YAML because the command writes it, not a person, and JSON is strict (no value guessed into
      a boolean or a date); it is written atomically (temporary file, then ``os.replace``) with mode 0600::

        {"version": 1,
         "keys": [{"id": "key_3f9a0c41d2b7", "name": "laptop", "scope": "inference", "models": ["qwen-7b"],
                   "max_concurrent": 2, "tokens_per_minute": 20000, "created": 1764870000,
                   "hash": "sha256:<64 hex digits>"}]}

      ``models`` null: every model; ``max_concurrent`` / ``tokens_per_minute`` null: no limit.

What is stored
    Only a SHA-256 of each key. Keys are made by :func:`new_key`: 32 bytes from :mod:`secrets` (256 bits), so
    nobody can guess one or search for one from its hash; password stretching (bcrypt, scrypt) exists to slow
    the search through the small space of human passwords and would buy nothing here but latency on every
    request. A key from the environment is hashed the same way as it is read, so no plaintext key is kept in a
    :class:`KeyStore` either. Keys never appear in logs or messages: a key is named by its id.

How a request is authenticated
    :func:`token_from_headers` takes the token from ``Authorization: Bearer`` or ``x-api-key`` (Anthropic
    clients); :meth:`KeyStore.authenticate` hashes it and compares the digest with *every* known digest using
    :func:`hmac.compare_digest`, without stopping at a match, so the time taken does not depend on which key
    (if any) matched or on how much of a digest agreed.

Reloading
    :meth:`KeyStore.authenticate` checks the key file at most once per second with one ``os.stat`` and reads it
    again when its inode, size or mtime changed, so ``gallama keys add`` and ``revoke`` take effect in a running
    server. A file that cannot be read or parsed keeps the last good set of keys and logs one warning per
    version of the file: a request never fails because of it.

    A key file that exists means "keys are required", even when it holds no key: revoking the last key must not
    open the server to everyone. Delete the file (and unset the environment keys) to run without keys.

Quotas
    :class:`QuotaTracker` counts, per key, the requests in flight and the tokens (prompt + completion) finished
    in the last 60 seconds. ``admit`` refuses when either limit is reached and says which limit, its value and
    when to retry. Tokens are counted when a request finishes, so requests admitted while under the limit run
    to completion: the token limit is a rate limit, not a hard cap on one request's size.

Nothing here imports a web framework: the gateway turns a :class:`Refusal` into a 429 with ``Retry-After``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config import ConfigError, check_served_name, inside_home

try:  # serialises `gallama keys` writers; the server only reads (atomic replace keeps reads whole)
    import fcntl
except ImportError:  # pragma: no cover - Windows: concurrent writers are not serialised
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

KEYS_FILE = "keys.json"
FILE_VERSION = 1
KEY_PREFIX = "gk-"
ID_PREFIX = "key_"
HASH_PREFIX = "sha256:"
ENV_API_KEYS = "GALLAMA_API_KEYS"
ENV_ADMIN_KEY = "GALLAMA_ADMIN_KEY"
RELOAD_INTERVAL_S = 1.0
QUOTA_WINDOW_S = 60.0

Scope = Literal["inference", "admin"]
SCOPES: tuple[Scope, ...] = ("inference", "admin")
NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
KEY_ID = re.compile(re.escape(ID_PREFIX) + r"[0-9a-f]{12}")
DIGEST = re.compile(re.escape(HASH_PREFIX) + r"[0-9a-f]{64}")


class KeyConfigError(ConfigError):
    """A key file that cannot be used, or a key setting that is refused; the message says what to fix."""


class UnknownKeyError(LookupError):
    """No key has the id or name given."""


class AmbiguousKeyError(LookupError):
    """A name given to revoke matches several keys; :attr:`ids` lists them."""

    def __init__(self, name: str, ids: list[str]) -> None:
        super().__init__(f"{len(ids)} keys are named {name!r} ({', '.join(ids)}): revoke one by its id")
        self.ids = ids


# -- keys and their digests -----------------------------------------------------------------------------

def new_key() -> str:
    """A fresh key: ``gk-`` and 43 URL-safe characters (256 random bits). The prefix makes a leaked key easy to
    recognise (secret scanners, logs)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _digest(token: str) -> bytes:
    # surrogatepass: any str (header values arrive decoded as latin-1) encodes losslessly, so two different
    # tokens never hash alike
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def hash_key(key: str) -> str:
    """What the key file stores for ``key``: ``sha256:<hex>`` (see the module docstring for why SHA-256)."""
    return HASH_PREFIX + _digest(key).hex()


def check_key_name(name: str) -> str:
    """Return ``name`` if it is a plain label (letters, digits, ``.``, ``_``, ``-``; 1 to 64 characters), else
    raise :class:`KeyConfigError`."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise KeyConfigError(f"key name {str(name)[:80]!r} is refused: use 1 to 64 letters, digits, '.', '_', '-'")
    return name


def _check_limit(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KeyConfigError(f"{what} must be a whole number of at least 1 or null, not {value!r}")
    return value


def _check_models(models: Iterable[str] | None) -> tuple[str, ...] | None:
    if models is None:
        return None
    if isinstance(models, str):
        raise KeyConfigError("models must be a list of model names, not one string")
    checked: list[str] = []
    for model in models:
        if not isinstance(model, str):
            raise KeyConfigError(f"model names are strings, not {model!r}")
        try:
            check_served_name(model, "model name")
        except ConfigError as error:
            raise KeyConfigError(str(error)) from None
        if model not in checked:
            checked.append(model)
    if not checked:
        raise KeyConfigError("models is an empty list: give at least one model, or none for every model")
    return tuple(checked)


# -- records of the key file ----------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyRecord:
    """One key of the key file. ``hash`` is left out of ``repr`` and of :meth:`public`."""

    id: str
    name: str
    scope: Scope
    models: tuple[str, ...] | None
    max_concurrent: int | None
    tokens_per_minute: int | None
    created: int
    hash: str = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "scope": self.scope,
                "models": list(self.models) if self.models is not None else None,
                "max_concurrent": self.max_concurrent, "tokens_per_minute": self.tokens_per_minute,
                "created": self.created, "hash": self.hash}

    def public(self) -> dict[str, Any]:
        """What ``gallama keys list`` may show: everything but the hash."""
        shown = self.to_json()
        del shown["hash"]
        return shown

    @classmethod
    def from_json(cls, data: Any, where: str) -> KeyRecord:
        """Validate one record; :class:`KeyConfigError` names ``where`` and the problem (never the hash)."""
        if not isinstance(data, dict):
            raise KeyConfigError(f"{where}: expected an object, got {type(data).__name__}")
        expected = {"id", "name", "scope", "models", "max_concurrent", "tokens_per_minute", "created", "hash"}
        missing, unknown = expected - data.keys(), data.keys() - expected
        if missing or unknown:
            problems = [f"missing {', '.join(sorted(missing))}"] if missing else []
            problems += [f"unknown {', '.join(sorted(map(str, unknown)))}"] if unknown else []
            raise KeyConfigError(f"{where}: {'; '.join(problems)}")
        try:
            if not isinstance(data["id"], str) or not KEY_ID.fullmatch(data["id"]):
                raise KeyConfigError(f"id {str(data['id'])[:40]!r} is not {ID_PREFIX} and 12 hex digits")
            if data["scope"] not in SCOPES:
                raise KeyConfigError(f"scope {str(data['scope'])[:40]!r} is not one of {', '.join(SCOPES)}")
            if not isinstance(data["hash"], str) or not DIGEST.fullmatch(data["hash"]):
                raise KeyConfigError(f"hash is not {HASH_PREFIX} and 64 hex digits")
            created = data["created"]
            if isinstance(created, bool) or not isinstance(created, int) or created < 0:
                raise KeyConfigError(f"created must be a unix time, not {created!r}")
            return cls(id=data["id"], name=check_key_name(data["name"]), scope=data["scope"],
                       models=_check_models(data["models"]),
                       max_concurrent=_check_limit(data["max_concurrent"], "max_concurrent"),
                       tokens_per_minute=_check_limit(data["tokens_per_minute"], "tokens_per_minute"),
                       created=created, hash=data["hash"])
        except KeyConfigError as error:
            raise KeyConfigError(f"{where}: {error}") from None


class KeyFile:
    """``GALLAMA_HOME_PATH/keys.json``: read, validated as a whole, and rewritten atomically with mode 0600."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home).expanduser()
        self.path = self.home / KEYS_FILE

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> list[KeyRecord]:
        """The records (``[]`` if there is no file); :class:`KeyConfigError` if any part of it is malformed."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as error:
            raise KeyConfigError(f"{self.path}: cannot be read ({error})") from None
        return self.parse(text)

    def parse(self, text: str) -> list[KeyRecord]:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise KeyConfigError(f"{self.path}: not valid JSON ({error})") from None
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise KeyConfigError(f"{self.path}: expected an object with a list 'keys'")
        if data.get("version") != FILE_VERSION:
            raise KeyConfigError(f"{self.path}: version {data.get('version')!r} is not {FILE_VERSION}; this "
                                 "gallama cannot read it")
        records = [KeyRecord.from_json(item, f"{self.path}: keys[{index}]") for index, item in
                   enumerate(data["keys"])]
        ids = [record.id for record in records]
        if len(set(ids)) != len(ids):
            raise KeyConfigError(f"{self.path}: an id appears twice")
        return records

    def write(self, records: list[KeyRecord]) -> None:
        """Replace the file with ``records``: a temporary file (mode 0600) in the same folder, then
        ``os.replace``, so a reader sees the old file or the new one, never half of one."""
        self.home.mkdir(parents=True, exist_ok=True)
        path = inside_home(self.home, KEYS_FILE)  # refuses a keys.json symlinked out of the home folder
        text = json.dumps({"version": FILE_VERSION, "keys": [record.to_json() for record in records]}, indent=2)
        fd, temporary = tempfile.mkstemp(dir=self.home, prefix=f".{KEYS_FILE}.")  # mkstemp: mode 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temporary, 0o600)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise read-modify-write cycles of ``gallama keys`` commands run at the same time."""
        self.home.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            yield
            return
        fd = os.open(self.home / f".{KEYS_FILE}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def add(self, name: str, *, admin: bool = False, models: Iterable[str] | None = None,
            max_concurrent: int | None = None, tokens_per_minute: int | None = None,
            now: Callable[[], float] = time.time) -> tuple[str, KeyRecord]:
        """Create a key, store its record and return ``(key, record)``. The key exists only in the return value:
        show it to the user once."""
        record_fields = {"name": check_key_name(name), "scope": "admin" if admin else "inference",
                         "models": _check_models(models),
                         "max_concurrent": _check_limit(max_concurrent, "max_concurrent"),
                         "tokens_per_minute": _check_limit(tokens_per_minute, "tokens_per_minute")}
        with self._locked():
            records = self.read()
            taken = {record.id for record in records}
            key_id = ID_PREFIX + secrets.token_hex(6)
            while key_id in taken:  # pragma: no cover - 48 random bits
                key_id = ID_PREFIX + secrets.token_hex(6)
            key = new_key()
            record = KeyRecord(id=key_id, created=int(now()), hash=hash_key(key), **record_fields)
            self.write([*records, record])
        return key, record

    def find(self, id_or_name: str, records: list[KeyRecord] | None = None) -> KeyRecord:
        """The record with id ``id_or_name``, else the one record with that name. :class:`UnknownKeyError` if
        none, :class:`AmbiguousKeyError` if the name is shared."""
        records = self.read() if records is None else records
        for record in records:
            if record.id == id_or_name:
                return record
        named = [record for record in records if record.name == id_or_name]
        if not named:
            raise UnknownKeyError(f"no key has the id or name {id_or_name[:80]!r} in {self.path}")
        if len(named) > 1:
            raise AmbiguousKeyError(id_or_name, [record.id for record in named])
        return named[0]

    def revoke(self, id_or_name: str) -> KeyRecord:
        """Remove the key :meth:`find` names from the file and return its record."""
        with self._locked():
            records = self.read()
            gone = self.find(id_or_name, records)
            self.write([record for record in records if record.id != gone.id])
        return gone


# -- who is calling -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Principal:
    """The key a request was authenticated with: what it may do and its quotas (``None``: no limit)."""

    key_id: str
    name: str
    scope: Scope
    models: frozenset[str] | None = None
    max_concurrent: int | None = None
    tokens_per_minute: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"

    def allows(self, scope: Scope) -> bool:
        """Whether this key may do what ``scope`` covers: an admin key may also do inference."""
        return self.is_admin or scope == "inference"

    def may_use(self, model_name: str) -> bool:
        """Whether this key may use the model served as ``model_name``. The caller decides which names count
        (the name the client sent, or the served model's name and aliases)."""
        return self.models is None or model_name in self.models

    @classmethod
    def from_record(cls, record: KeyRecord) -> Principal:
        return cls(key_id=record.id, name=record.name, scope=record.scope,
                   models=frozenset(record.models) if record.models is not None else None,
                   max_concurrent=record.max_concurrent, tokens_per_minute=record.tokens_per_minute)


def env_principals(api_keys: str | None, admin_key: str | None) -> list[tuple[Principal, str]]:
    """The keys the environment grants, as ``(principal, key)`` pairs: ``GALLAMA_ADMIN_KEY`` first, then each
    non-empty entry of the comma-separated ``GALLAMA_API_KEYS`` (every model, no quotas)."""
    found: list[tuple[Principal, str]] = []
    if admin_key and admin_key.strip():
        found.append((Principal(f"env:{ENV_ADMIN_KEY}", ENV_ADMIN_KEY, "admin"), admin_key.strip()))
    keys = [key.strip() for key in (api_keys or "").split(",")]
    for index, key in enumerate(key for key in keys if key):
        label = f"{ENV_API_KEYS}[{index}]"
        found.append((Principal(f"env:{label}", label, "inference"), key))
    return found


def token_from_headers(headers: Mapping[str, str]) -> str | None:
    """The key a request presents: ``Authorization: Bearer <key>`` (scheme in any case) or, for Anthropic
    clients, ``x-api-key: <key>``. ``None`` when neither holds a token. Header names are matched in any case,
    so a plain dict works as well as Starlette's headers."""
    lowered = {str(name).lower(): value for name, value in headers.items()}
    authorization = lowered.get("authorization")
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    api_key = lowered.get("x-api-key")
    if api_key and api_key.strip():
        return api_key.strip()
    return None


class KeyStore:
    """Every key that grants access: the environment's and the key file's, the file reread when it changes.

    :param home: ``GALLAMA_HOME_PATH``; the key file is ``home/keys.json``.
    :param api_keys: ``GALLAMA_API_KEYS`` (comma separated inference keys) or ``None``.
    :param admin_key: ``GALLAMA_ADMIN_KEY`` or ``None``.
    :param clock: monotonic seconds; tests inject one to step past the reload interval.
    """

    def __init__(self, home: Path, api_keys: str | None, admin_key: str | None, *,
                 clock: Callable[[], float] = time.monotonic, reload_interval_s: float = RELOAD_INTERVAL_S) -> None:
        self.file = KeyFile(home)
        self._env = [(principal, _digest(key)) for principal, key in env_principals(api_keys, admin_key)]
        self._clock = clock
        self._interval = reload_interval_s
        self._lock = threading.Lock()
        self._file_keys: list[tuple[Principal, bytes]] = []
        self._signature: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) of the file last read
        self._file_present = False
        self._warned: tuple[int, int, int] | None = None
        self._checked_at: float | None = None
        self.reload()

    @property
    def path(self) -> Path:
        return self.file.path

    def reload(self) -> None:
        """Check the key file now (not waiting for the interval) and reread it if it changed."""
        with self._lock:
            self._checked_at = self._clock()
            self._refresh()

    def _maybe_reload(self) -> None:
        now = self._clock()
        if self._checked_at is not None and now - self._checked_at < self._interval:
            return
        with self._lock:
            if self._checked_at is not None and now - self._checked_at < self._interval:
                return  # another thread checked meanwhile
            self._checked_at = now
            self._refresh()

    def _refresh(self) -> None:
        try:
            info = os.stat(self.file.path)
        except FileNotFoundError:
            if self._file_present or self._file_keys:
                log.info("key file %s removed: only environment keys remain", self.file.path)
            self._file_keys, self._signature, self._file_present = [], None, False
            return
        except OSError as error:
            self._file_present = True  # fail closed: a key file that may exist still means keys are required
            self._warn_once((-1, -1, -1), f"key file {self.file.path} cannot be checked ({error.strerror}); "
                            "keeping the keys read before")
            return
        self._file_present = True
        # the inode changes on every os.replace, so two writes within one mtime tick are still told apart
        signature = (info.st_ino, info.st_size, info.st_mtime_ns)
        if signature in (self._signature, self._warned):
            return  # unchanged, or the same broken version already warned about
        try:
            records = self.file.read()
        except KeyConfigError as error:
            self._warn_once(signature, f"{error}; keeping the {len(self._file_keys)} file keys read before")
            return
        self._file_keys = [(Principal.from_record(r), bytes.fromhex(r.hash.removeprefix(HASH_PREFIX)))
                           for r in records]
        self._signature = signature
        log.info("key file %s loaded: %d keys", self.file.path, len(records))

    def _warn_once(self, signature: tuple[int, int, int], message: str) -> None:
        if self._warned != signature:
            self._warned = signature
            log.warning("%s", message)

    @property
    def configured(self) -> bool:
        """Whether requests need a key: some key exists, or the key file exists (even empty or unreadable, so
        that revoking the last key or breaking the file never opens the server)."""
        self._maybe_reload()
        return bool(self._env or self._file_keys or self._file_present)

    @property
    def inference_configured(self) -> bool:
        """Whether inference needs a key: an inference key is set (``GALLAMA_API_KEYS``) or the key file exists.
        ``GALLAMA_ADMIN_KEY`` alone protects administration only, as it always has."""
        self._maybe_reload()
        return bool(self._file_keys or self._file_present or any(not p.is_admin for p, _ in self._env))

    @property
    def admin_configured(self) -> bool:
        """Whether some admin key exists (environment or file)."""
        self._maybe_reload()
        return any(principal.is_admin for principal, _ in [*self._env, *self._file_keys])

    def principals(self) -> list[Principal]:
        """Every key, environment first (for listings; no key or hash in them)."""
        self._maybe_reload()
        return [principal for principal, _ in [*self._env, *self._file_keys]]

    def authenticate(self, token: str | None) -> Principal | None:
        """The principal whose key is ``token``, or ``None``. The digest of ``token`` is compared with every
        known digest in constant time, all of them every time, so timing tells nothing about which matched."""
        self._maybe_reload()
        if not token:
            return None
        given = _digest(token)
        found: Principal | None = None
        for principal, digest in [*self._env, *self._file_keys]:
            if hmac.compare_digest(given, digest) and found is None:
                found = principal
        return found


# -- quotas ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Refusal:
    """A request a key's quota does not admit: answer 429 with ``Retry-After: retry_after``."""

    key_id: str
    limit: Literal["max_concurrent", "tokens_per_minute"]
    value: int
    retry_after: int
    message: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class Admission:
    """A request a key's quota admitted. Call :meth:`finish` once it ends, however it ends (further calls do
    nothing): it frees the concurrency slot and counts the request's tokens."""

    def __init__(self, tracker: QuotaTracker, key_id: str) -> None:
        self._tracker = tracker
        self.key_id = key_id
        self.finished = False

    def finish(self, tokens: int = 0) -> None:
        """End the request, counting ``tokens`` (prompt + completion) against the key's tokens per minute."""
        self._tracker._finish(self, max(0, int(tokens)))


@dataclass
class _Spent:
    """Tokens of the requests that finished between ``first`` and ``last`` (less than a second apart): sharing
    an entry keeps a key at about window + 1 entries however many requests it sends. The entry expires a window
    after ``last``, so merging never lets tokens leave the window early."""

    first: float
    last: float
    tokens: int


@dataclass
class _Usage:
    in_flight: int = 0
    spent: deque[_Spent] = field(default_factory=deque)
    total: int = 0


class QuotaTracker:
    """Per-key concurrency and tokens-per-minute limits. Thread-safe; every method returns at once, so the
    event loop can call it directly.

    :param clock: monotonic seconds (tests inject one).
    :param window_s: the sliding window of ``tokens_per_minute``.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, window_s: float = QUOTA_WINDOW_S) -> None:
        self._clock = clock
        self._window = window_s
        self._lock = threading.Lock()
        self._keys: dict[str, _Usage] = {}

    def _prune(self, usage: _Usage, now: float) -> None:
        while usage.spent and now - usage.spent[0].last >= self._window:
            usage.total -= usage.spent.popleft().tokens

    def _forget_if_idle(self, key_id: str, usage: _Usage) -> None:
        if not usage.in_flight and not usage.spent:
            self._keys.pop(key_id, None)

    def admit(self, principal: Principal) -> Admission | Refusal:
        """Admit a request of ``principal`` (taking a concurrency slot) or say which limit refuses it."""
        with self._lock:
            now = self._clock()
            usage = self._keys.setdefault(principal.key_id, _Usage())
            self._prune(usage, now)
            limit = principal.tokens_per_minute
            if limit is not None and usage.total >= limit:
                retry = self._tokens_retry_after(usage, limit, now)
                return Refusal(principal.key_id, "tokens_per_minute", limit, retry,
                               f"key {principal.name} ({principal.key_id}) used {usage.total} tokens in the last "
                               f"{self._window:g} s, its limit is tokens_per_minute={limit}; retry after {retry} s")
            cap = principal.max_concurrent
            if cap is not None and usage.in_flight >= cap:
                return Refusal(principal.key_id, "max_concurrent", cap, 1,
                               f"key {principal.name} ({principal.key_id}) has {usage.in_flight} requests in "
                               f"flight, its limit is max_concurrent={cap}; retry after 1 s")
            usage.in_flight += 1
            return Admission(self, principal.key_id)

    def _tokens_retry_after(self, usage: _Usage, limit: int, now: float) -> int:
        """Seconds until enough of the window's tokens expire to bring the total under ``limit``."""
        remaining = usage.total
        for entry in usage.spent:
            remaining -= entry.tokens
            if remaining < limit:
                return max(1, math.ceil(entry.last + self._window - now))
        return 1  # pragma: no cover - total >= limit implies some entry brings it under

    def _finish(self, admission: Admission, tokens: int) -> None:
        with self._lock:
            if admission.finished:
                return
            admission.finished = True
            now = self._clock()
            usage = self._keys.setdefault(admission.key_id, _Usage())
            usage.in_flight = max(0, usage.in_flight - 1)
            self._prune(usage, now)
            if tokens:
                if usage.spent and now - usage.spent[-1].first < 1.0:
                    usage.spent[-1].last = now
                    usage.spent[-1].tokens += tokens
                else:
                    usage.spent.append(_Spent(now, now, tokens))
                usage.total += tokens
            self._forget_if_idle(admission.key_id, usage)

    def usage(self, key_id: str) -> dict[str, int]:
        """``{"in_flight": …, "tokens_last_minute": …}`` for ``key_id`` (zeros for a key not seen)."""
        with self._lock:
            usage = self._keys.get(key_id)
            if usage is None:
                return {"in_flight": 0, "tokens_last_minute": 0}
            self._prune(usage, self._clock())
            result = {"in_flight": usage.in_flight, "tokens_last_minute": usage.total}
            self._forget_if_idle(key_id, usage)
            return result
