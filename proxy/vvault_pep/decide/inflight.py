"""In-flight limits: how many requests one caller may have open at once.

A rate limit counts arrivals; it cannot stop a few slow requests from holding
every pooled upstream connection.  This counts requests *in flight* — from
the moment they are forwarded until their answer has been sent — per client
certificate and per subject, and refuses the one over the limit at once (429
``ratelimit.concurrency`` with ``Retry-After``) rather than letting it queue
for the pool.

Keys come from verified identity only: the client certificate's SHA-256
thumbprint (the source address when the listener lets a client in without
one), and the subject's principal (:attr:`.principal.Subject.principal`): the
issuer-qualified user, else the workload's SPIFFE ID.  Counts live in
this process, like the connections they protect.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..core.principal import Subject
from ..errors import PepError


def client_of(who: Subject, source_ip: str | None) -> str:
    """The client connection's name: its certificate's thumbprint, else the source address."""
    return f"cert:{who.certificate}" if who.certificate is not None else f"ip:{source_ip or 'unknown'}"


class InFlight:
    def __init__(self, *, per_client: int, per_subject: int) -> None:
        self.per_client = per_client
        self.per_subject = per_subject
        self._counts: dict[str, int] = {}

    def count(self, key: str) -> int:
        return self._counts.get(key, 0)

    def take(self, client: str, subject: str | None) -> Callable[[], None]:
        """One slot for this caller, or PepError(429); returns the (idempotent) release."""
        keys = [(f"client:{client}", self.per_client)]
        if subject is not None:
            keys.append((f"subject:{subject}", self.per_subject))
        # Check and take without an await in between: atomic on the event loop.
        for key, limit in keys:
            if self._counts.get(key, 0) >= limit:
                raise PepError(
                    "ratelimit.concurrency",
                    "too many requests in flight for this caller",
                    headers=(("Retry-After", "1"),),
                )
        for key, _ in keys:
            self._counts[key] = self._counts.get(key, 0) + 1
        held = [key for key, _ in keys]

        def release() -> None:
            while held:
                key = held.pop()
                left = self._counts[key] - 1
                if left:
                    self._counts[key] = left
                else:
                    del self._counts[key]

        return release

    @contextmanager
    def hold(self, client: str, subject: str | None) -> Iterator[None]:
        """:meth:`take` for the duration of a block."""
        release = self.take(client, subject)
        try:
            yield
        finally:
            release()


def nothing_held() -> None:
    """The release of a slot never taken."""
