"""Leases: one writer at a time for something shared (a split being ingested, a model's aliases being moved),
held as a small JSON object created with :func:`pipeline.storage.create_exclusive` (a local hard link, an S3
``If-None-Match: *`` PUT), so that it works the same on a laptop folder and in a bucket.

A lease names its holder (host, pid, user), when it was taken and when it expires. Of two takers exactly one
creates it; the other is refused with a message naming the holder and the lease's URL. A lease whose holder
died is taken over: once it has expired, or at once when its holder ran on this host and its process is gone.
The holder releases it when done (the object is deleted only while it is still its own) and checks
:meth:`Lease.still_held` before publishing what the lease protects.

Taking over an expired lease is a delete then a create: two takers at the same moment could both see it
expired; the create decides between them, but a delete can still remove the lease the other just created.
Expiries long enough for the work (and :meth:`Lease.still_held` before publishing) keep that window to crashes.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass

from pipeline import storage
from pipeline.errors import WysiwycError
from pipeline.tracking import current_user


def process_running(pid: int | str) -> bool:
    """Whether the process ``pid`` of this host exists; True when it cannot be told (another user's, not a pid)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, OSError):  # PermissionError: another user's process
        return True
    return True


@dataclass
class Lease:
    """A lease on ``url`` (see the module), taken by :meth:`take`; a context manager that releases it."""

    url: str
    record: dict
    opts: object = None

    @classmethod
    def take(cls, url: str, what: str, ttl_s: float, opts=None, howto: str = "") -> Lease:
        """Take the lease at ``url`` for ``ttl_s`` seconds, or raise :class:`WysiwycError` naming ``what`` is held,
        by whom, until when, and ``howto`` (what the user can do)."""
        now = time.time()
        record = {
            "what": what,
            "token": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "user": current_user(),
            "taken_at": now,
            "expires_at": now + ttl_s,
        }
        data = json.dumps(record, indent=1).encode()
        for _ in range(2):  # a second try after taking over a dead holder's lease
            if storage.create_exclusive(url, data, opts):
                return cls(url, record, opts)
            held = cls._read(url, opts)
            if held is None:  # released between the two calls
                continue
            if not cls._dead(held, now):
                until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(held.get("expires_at", 0)))
                raise WysiwycError(
                    f"{what} is held by {held.get('user')} (pid {held.get('pid')} on {held.get('host')}) until "
                    f"{until}: {storage.redact(url)}. Wait for it to finish{howto}; if that process is gone, delete "
                    "that file"
                )
            storage.delete(url, opts)
        raise WysiwycError(f"{what}: could not take {storage.redact(url)}: another process took it at the same moment")

    @staticmethod
    def _read(url: str, opts) -> dict | None:
        try:
            return json.loads(storage.read_bytes(url, opts))
        except storage.NotFound:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}  # not a lease record: expired (taken over)

    @staticmethod
    def _dead(held: dict, now: float) -> bool:
        if float(held.get("expires_at", 0)) < now:
            return True
        return held.get("host") == socket.gethostname() and not process_running(held.get("pid", 0))

    def still_held(self) -> bool:
        """Whether the object at the URL is still this lease (not expired and taken over by another)."""
        held = self._read(self.url, self.opts)
        return bool(held) and held.get("token") == self.record["token"]

    def release(self) -> None:
        """Delete the lease if it is still this one."""
        if self.still_held():
            storage.delete(self.url, self.opts)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
