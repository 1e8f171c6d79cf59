"""API keys: who is calling (a named key with a role and its knowledge bases) and what it may
do. Keys are kept as SHA-256 digests only, and never logged."""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from supportqa_server.errors import PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

READER, WRITER, ADMIN = "reader", "writer", "admin"
RANK = {READER: 1, WRITER: 2, ADMIN: 3}
# The role each supportqa method needs; health and reflection need none.
ROLE_OF = {
    "/supportqa.v1.Answering/Ask": READER,
    "/supportqa.v1.Answering/AskStream": READER,
    "/supportqa.v1.Answering/Converse": READER,
    "/supportqa.v1.Knowledge/Get": READER,
    "/supportqa.v1.Knowledge/Stats": READER,
    "/supportqa.v1.Knowledge/ListIds": READER,
    "/supportqa.v1.Knowledge/Upsert": WRITER,
    "/supportqa.v1.Knowledge/Delete": WRITER,
    # A bot says whether an answer helped; suggestions show customers' (masked) questions and
    # lint reads every row, so both are for the people who edit the knowledge base; deleting
    # a conversation's questions (a privacy request) is an administrator's.
    "/supportqa.v1.Answering/Feedback": READER,
    "/supportqa.v1.Knowledge/Suggest": WRITER,
    "/supportqa.v1.Knowledge/Lint": WRITER,
    "/supportqa.v1.Knowledge/DeleteQuestions": ADMIN,
}
ALL = "*"


@dataclass(frozen=True)
class Principal:
    """A caller's key: its name (for logs), role and the knowledge bases it may use."""

    name: str
    role: str
    knowledge_bases: frozenset[str] = frozenset({ALL})

    def can_see(self, kb: str) -> bool:
        return self.role == ADMIN or ALL in self.knowledge_bases or kb in self.knowledge_bases

    def require(self, kb: str, role: str = READER) -> None:
        """Raises PermissionDenied unless this key may use kb with role's rights."""
        if RANK[self.role] < RANK[role]:
            raise PermissionDenied(
                f"key {self.name!r} is a {self.role} key; this call needs a {role} key")
        if not self.can_see(kb):
            raise PermissionDenied(f"key {self.name!r} may not use knowledge base {kb!r}")


# No authentication configured: every caller is this.
ANONYMOUS = Principal("anonymous", ADMIN)
_current: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "supportqa_principal", default=ANONYMOUS)


def current() -> Principal:
    """The principal of the call being served (ANONYMOUS without keys)."""
    return _current.get()


def set_current(principal: Principal) -> contextvars.Token:
    return _current.set(principal)


def reset_current(token: contextvars.Token) -> None:
    _current.reset(token)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _read_file(path: Path) -> dict[str, Principal]:
    """sha256 hex -> Principal from a keys file; raises ValueError naming what is wrong."""
    try:
        items = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {e}") from e
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of keys")
    out: dict[str, Principal] = {}
    for i, it in enumerate(items):
        where = f"{path}: key #{i + 1}"
        if not isinstance(it, dict):
            raise ValueError(f"{where}: expected an object")
        name, sha, role = it.get("name"), str(it.get("key_sha256", "")).lower(), it.get("role")
        kbs = it.get("knowledge_bases", [ALL])
        if not name or not isinstance(name, str):
            raise ValueError(f"{where}: needs a name")
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError(f"{where} ({name}): key_sha256 must be 64 hex digits "
                             "(sha256sum of the key)")
        if role not in RANK:
            raise ValueError(f"{where} ({name}): role must be reader, writer or admin")
        if not isinstance(kbs, list) or not all(isinstance(k, str) for k in kbs):
            raise ValueError(f"{where} ({name}): knowledge_bases must be a list of names or \"*\"")
        if sha in out:
            raise ValueError(f"{where} ({name}): the same key as {out[sha].name!r}")
        out[sha] = Principal(name, role, frozenset(kbs))
    return out


class KeyRing:
    """The keys a server accepts: `SUPPORTQA_API_KEYS` (admin keys) and the scoped keys of
    `SUPPORTQA_API_KEYS_FILE`, re-read by `reload` (on SIGHUP)."""

    def __init__(self, admin_keys: list[str], path: Path | None) -> None:
        self.path = path
        self._admins = {digest(k): Principal(f"admin-key-{i + 1}", ADMIN)
                        for i, k in enumerate(admin_keys)}
        self._keys: dict[str, Principal] = {}
        self._lock = threading.Lock()
        if path is not None:
            self._keys = _read_file(path)  # a bad file at start-up stops the server

    @property
    def enabled(self) -> bool:
        return bool(self._admins) or self.path is not None

    def reload(self) -> None:
        """Re-reads the keys file; a bad file keeps the keys already loaded."""
        if self.path is None:
            return
        try:
            keys = _read_file(self.path)
        except ValueError as e:
            log.error("API keys not reloaded, the previous ones stay: %s", e)
            return
        with self._lock:
            self._keys = keys
        log.info("API keys reloaded: %d keys (%s)", len(keys),
                 ", ".join(sorted(p.name for p in keys.values())))

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an `authorization: Bearer KEY` value; raises Unauthenticated."""
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthenticated(
                "missing API key: send metadata 'authorization: Bearer <key>'")
        presented = digest(authorization[len("Bearer "):])
        with self._lock:
            candidates = {**self._keys, **self._admins}
        found = None
        for sha, principal in candidates.items():  # every digest compared, in constant time
            if hmac.compare_digest(sha, presented):
                found = principal
        if found is None:
            raise Unauthenticated("unknown API key: send 'authorization: Bearer <key>' with a "
                                  "key this server was given")
        return found
