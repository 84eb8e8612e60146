"""Write protection: a read-only switch, and HTTP Basic credentials from an htpasswd file.

Checking credentials goes through ``twisted.cred``: a :class:`HtpasswdChecker` (bcrypt
entries of an Apache htpasswd file, re-read when the file changes) behind a ``Portal``
whose realm hands back the routes. bcrypt is slow on purpose, so it runs on the server's
thread pool and a verified (user, password, entry) is remembered for a while.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import bcrypt
from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.guard import BasicCredentialFactory
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.util import DeferredResource
from zope.interface import Interface, implementer

from neurotrale_twisted.web.responses import JsonErrorResource, error_response

log = Logger()

#: Methods that only read; every other method counts as a write (the policy fails closed).
READ_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})
#: URL paths (folded segments) answered without credentials even with ``--auth-reads``: the
#: health check, which load balancers and container health checks call without any.
PUBLIC_PATHS = frozenset({(b"healthz",)})
#: bcrypt uses at most this many bytes of a password (and bcrypt 5 refuses longer ones).
BCRYPT_MAX_PASSWORD = 72
#: How long a verified password is trusted before bcrypt checks it again, in seconds.
VERIFIED_FOR = 300.0


def read_htpasswd(path: str) -> dict[bytes, bytes]:
    """The bcrypt entries (``user:$2y$...``) of an htpasswd file; other lines are skipped.

    Raises ``OSError`` when the file cannot be read.
    """
    entries: dict[bytes, bytes] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith(b"#"):
                continue
            user, sep, hashed = line.partition(b":")
            if not sep or not hashed.startswith((b"$2a$", b"$2b$", b"$2y$")):
                log.warn(
                    "{path}:{number}: not a bcrypt entry (make one with htpasswd -B); skipped",
                    path=path,
                    number=number,
                )
                continue
            entries[user] = hashed
    return entries


@implementer(ICredentialsChecker)
class HtpasswdChecker:
    """Checks user names and passwords against the bcrypt entries of an htpasswd file."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(
        self, path: str, run_in_thread: Callable[..., Deferred[Any]], clock: Any = time
    ) -> None:
        self.path = path
        self._run_in_thread = run_in_thread
        self._clock = clock
        self._stamp: tuple[int, int] | None = None
        self._entries: dict[bytes, bytes] = {}
        self._verified: dict[bytes, float] = {}
        #: What an unknown user's password is checked against (see :func:`dummy_hash`).
        self._dummy = b""
        self._lock = threading.Lock()
        self._entries_now()  # a missing or unreadable file stops the server at start-up

    def _entries_now(self) -> dict[bytes, bytes]:
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._entries = read_htpasswd(self.path)
            self._dummy = dummy_hash(self._entries.values())
            self._stamp = stamp
            self._verified.clear()
        return self._entries

    def requestAvatarId(self, creds: IUsernamePassword) -> Deferred[bytes | tuple[()]]:
        """The user name, once the password matches its entry; ``UnauthorizedLogin`` else."""
        try:
            stored = self._entries_now().get(creds.username)
        except OSError as e:
            log.error("cannot read {path}: {e}", path=self.path, e=e)
            return fail(error.UnauthorizedLogin())
        password: bytes = creds.password
        if len(password) > BCRYPT_MAX_PASSWORD:
            return fail(error.UnauthorizedLogin())  # bcrypt refuses them; no entry can match
        if stored is None:
            # As slow as a wrong password, so that timing does not tell which users exist.
            return self._run_in_thread(_refuse_after_bcrypt, password, self._dummy)
        key = hashlib.sha256(creds.username + b"\0" + password + b"\0" + stored).digest()
        now = self._clock.monotonic()
        with self._lock:
            if self._verified.get(key, 0.0) > now:
                return succeed(bytes(creds.username))

        def verified(ok: bool) -> bytes:
            if not ok:
                raise error.UnauthorizedLogin()
            with self._lock:
                self._verified[key] = self._clock.monotonic() + VERIFIED_FOR
            return bytes(creds.username)

        return self._run_in_thread(_bcrypt_matches, password, stored).addCallback(verified)


def dummy_hash(entries: Iterable[bytes]) -> bytes:
    """A bcrypt hash no password matches, of the cost most ``entries`` have (12 if none).

    Checking it costs what checking a real entry costs, and making it costs nothing: a fresh
    salt and a digest that no hash of that salt has.
    """
    costs = Counter(
        int(parts[2])
        for parts in (hashed.split(b"$") for hashed in entries)
        if len(parts) > 2 and parts[2].isdigit() and 4 <= int(parts[2]) <= 31
    )
    cost = costs.most_common(1)[0][0] if costs else 12
    return bytes(bcrypt.gensalt(cost)) + b"." * 31


def _refuse_after_bcrypt(password: bytes, dummy: bytes) -> bytes:
    """Check ``password`` against ``dummy`` (in a pool thread) for its cost, then refuse."""
    _bcrypt_matches(password, dummy)
    raise error.UnauthorizedLogin()


def _bcrypt_matches(password: bytes, stored: bytes) -> bool:
    """Whether ``password`` matches the bcrypt hash ``stored``; False for a malformed hash."""
    try:
        return bool(bcrypt.checkpw(password, stored))
    except ValueError:
        log.warn("a bcrypt entry of the htpasswd file is malformed")
        return False


@implementer(IRealm)
class RoutesRealm:
    """Gives every authenticated user the same avatar: the application's routes."""

    def __init__(self, routes: IResource) -> None:
        self.routes = routes

    def requestAvatar(
        self, avatar_id: bytes | tuple[()], mind: object, *interfaces: type[Interface]
    ) -> tuple[type[Interface], IResource, Callable[[], None]]:
        """The routes, as an ``IResource`` avatar."""
        if IResource not in interfaces:
            raise NotImplementedError("only IResource avatars")
        return IResource, self.routes, lambda: None


class WritePolicy:
    """Who may change files: nobody (read-only), anyone, or holders of credentials.

    With credentials required (``portal`` given), writes (and reads too when
    ``auth_reads``) must carry HTTP Basic credentials that the portal accepts; the others
    get a JSON 401 with a ``WWW-Authenticate`` challenge. Preflights and the reads of
    :data:`PUBLIC_PATHS` never need them. Any method but ``GET``, ``HEAD`` and ``OPTIONS``
    is a write; the site's root has already refused every method that is not an exact token.
    """

    realm_name = b"neurotrale"

    def __init__(
        self, read_only: bool = False, portal: Portal | None = None, auth_reads: bool = False
    ) -> None:
        self.read_only = read_only
        self.portal = portal
        self.auth_reads = auth_reads
        self._basic = BasicCredentialFactory(self.realm_name)

    def render(self, request: IRequest, routes: IResource) -> bytes | int:
        """Render ``request`` through ``routes`` if the policy lets it through."""
        writing = request.method not in READ_METHODS
        if writing and self.read_only:
            return error_response(request, 403, "this server is read-only")
        public = not writing and tuple(request.postpath) in PUBLIC_PATHS
        if self.portal is None or public or not (writing or self.auth_reads):
            return _render(routes, request)
        header = request.getHeader(b"authorization") or b""
        scheme, _, response = header.partition(b" ")
        if scheme.lower() != b"basic":
            return _render(self._challenge("credentials are required"), request)
        try:
            creds = self._basic.decode(response.strip(), request)
        except error.LoginFailed:
            return _render(self._challenge("malformed Basic credentials"), request)
        login = self.portal.login(creds, None, IResource)

        def granted(result: tuple[type[Interface], IResource, Callable[[], None]]) -> IResource:
            return result[1]

        def refused(failure: Failure) -> IResource:
            failure.trap(error.UnauthorizedLogin, error.UnhandledCredentials)
            return self._challenge("the credentials were refused")

        return _render(DeferredResource(login.addCallbacks(granted, refused)), request)

    def _challenge(self, message: str) -> IResource:
        return ChallengeResource(self.realm_name, message)


def _render(resource: IResource, request: IRequest) -> bytes | int:
    """``resource.render(request)``: a body, or ``NOT_DONE_YET`` (Twisted leaves it untyped)."""
    answer: bytes | int = resource.render(request)
    return answer


class ChallengeResource(JsonErrorResource):
    """A JSON 401 with the ``WWW-Authenticate`` challenge that makes clients send credentials."""

    def __init__(self, realm: bytes, message: str) -> None:
        super().__init__(401, message)
        self.realm = realm

    def render(self, request: IRequest) -> bytes:
        """Answer 401 with the challenge."""
        request.setHeader(b"www-authenticate", b'Basic realm="%s"' % self.realm)
        return super().render(request)


def make_portal(htpasswd: str, routes: IResource, run_in_thread: Callable[..., Any]) -> Portal:
    """A portal checking ``htpasswd`` whose avatar is ``routes``."""
    return Portal(RoutesRealm(routes), [HtpasswdChecker(htpasswd, run_in_thread)])
