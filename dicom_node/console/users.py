"""The console's local users: argon2id password hashes, a role, a lock after repeated wrong passwords, and one API
token per user (only its SHA-256 is kept). Stored in the job store's ``users`` table, so every node process and
the ``dicom-node users`` command see the same accounts.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, insert, select, update

from dicom_node.jobs.schema import users
from dicom_node.jobs.store import JobStore

__all__ = ["LoginResult", "Role", "User", "UserError", "UserStore", "check_name"]

log = logging.getLogger(__name__)

_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters
#: Verified against when the user does not exist, so a wrong name costs what a wrong password does.
_DUMMY_HASH = _hasher.hash("not a password of anyone")
_MIN_PASSWORD = 8


class Role(str, enum.Enum):
    VIEWER = "viewer"  # reads every page
    ADMIN = "admin"  # and acts: retry, cancel, echo, test notifications


class UserError(ValueError):
    """A user command that cannot be done; the message says why."""


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    locked: bool
    failed_logins: int
    has_token: bool

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


class LoginResult(enum.Enum):
    OK = "ok"
    WRONG = "wrong name or password"
    LOCKED = ("account locked after repeated wrong passwords; it opens again after console.lockout_minutes, or when "
              "an administrator sets its password (dicom-node users passwd)")


def check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 64 or not all(c.isalnum() or c in "._-@" for c in name):
        raise UserError(f"user name {name!r}: 1 to 64 letters, digits or . _ - @")
    return name


def _check_password(password: str) -> None:
    if len(password) < _MIN_PASSWORD:
        raise UserError(f"password too short: at least {_MIN_PASSWORD} characters")


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class UserStore:
    def __init__(self, store: JobStore, max_failed: int = 5, lockout_minutes: float = 15) -> None:
        self.engine = store.engine
        self.max_failed = max_failed
        self.lockout_seconds = lockout_minutes * 60

    @staticmethod
    def _still_locked(m: Any, now: float) -> bool:
        return bool(m["locked"]) and (m["locked_until"] is None or now < m["locked_until"])

    @staticmethod
    def _user(row: object) -> User:
        m = row._mapping  # type: ignore[attr-defined]
        locked = UserStore._still_locked(m, time.time())
        return User(m["name"], Role(m["role"]), locked, int(m["failed_logins"]), bool(m["token_hash"]))

    def get(self, name: str) -> User | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.name == name)).first()
        return self._user(row) if row else None

    def all(self) -> list[User]:
        with self.engine.connect() as conn:
            return [self._user(r) for r in conn.execute(select(users).order_by(users.c.name)).all()]

    def add(self, name: str, password: str, role: Role) -> User:
        name = check_name(name)
        _check_password(password)
        with self.engine.begin() as conn:
            if conn.execute(select(users.c.name).where(users.c.name == name)).first() is not None:
                raise UserError(f"user {name!r} exists already (dicom-node users passwd changes a password)")
            conn.execute(
                insert(users).values(
                    name=name, password_hash=_hasher.hash(password), role=Role(role).value, failed_logins=0,
                    locked=False, created_at=time.time(),
                )
            )
        return User(name, Role(role), False, 0, False)

    def remove(self, name: str) -> None:
        with self.engine.begin() as conn:
            if not conn.execute(delete(users).where(users.c.name == name)).rowcount:
                raise UserError(f"no user {name!r}")

    def set_password(self, name: str, password: str) -> None:
        """A new password; it also unlocks the account."""
        _check_password(password)
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(users)
                .where(users.c.name == name)
                .values(password_hash=_hasher.hash(password), failed_logins=0, locked=False, locked_until=None)
            ).rowcount
        if not changed:
            raise UserError(f"no user {name!r}")

    def set_role(self, name: str, role: Role) -> None:
        with self.engine.begin() as conn:
            if not conn.execute(update(users).where(users.c.name == name).values(role=Role(role).value)).rowcount:
                raise UserError(f"no user {name!r}")

    def authenticate(self, name: str, password: str) -> tuple[LoginResult, User | None]:
        """Check a log-in. A wrong password counts against the account; ``max_failed`` in a row lock it (a locked
        account answers LOCKED even to the right password)."""
        with self.engine.begin() as conn:
            row = conn.execute(select(users).where(users.c.name == name).with_for_update()).first()
            if row is None:
                try:
                    _hasher.verify(_DUMMY_HASH, password)
                except VerificationError:
                    pass
                return LoginResult.WRONG, None
            m = row._mapping
            now = time.time()
            if self._still_locked(m, now):
                return LoginResult.LOCKED, None
            lapsed = bool(m["locked"])  # a lock that ran out: the count starts again
            try:
                _hasher.verify(m["password_hash"], password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                failed = (0 if lapsed else int(m["failed_logins"])) + 1
                locked = failed >= self.max_failed
                until = now + self.lockout_seconds if locked and self.lockout_seconds else None
                conn.execute(update(users).where(users.c.name == name).values(
                    failed_logins=failed, locked=locked, locked_until=until))
                if locked:
                    log.warning("console user %s locked after %d wrong passwords (%s)", name, failed,
                                f"for {self.lockout_seconds / 60:g} min" if until else "until passwd")
                    return LoginResult.LOCKED, None
                return LoginResult.WRONG, None
            values: dict[str, object] = {"failed_logins": 0, "locked": False, "locked_until": None}
            if _hasher.check_needs_rehash(m["password_hash"]):
                values["password_hash"] = _hasher.hash(password)
            conn.execute(update(users).where(users.c.name == name).values(**values))
        user = self._user(row)
        return LoginResult.OK, User(user.name, user.role, False, 0, user.has_token)

    def new_token(self, name: str) -> str:
        """A new API token for ``name`` (the previous one stops working); shown once, only its hash is kept."""
        token = "dn_" + secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(users).where(users.c.name == name).values(token_hash=_token_hash(token))
            ).rowcount
        if not changed:
            raise UserError(f"no user {name!r}")
        return token

    def by_token(self, token: str) -> User | None:
        digest = _token_hash(token)
        with self.engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.token_hash == digest)).first()
        if row is None or self._still_locked(row._mapping, time.time()) or not hmac.compare_digest(
                row._mapping["token_hash"], digest):
            return None
        return self._user(row)
