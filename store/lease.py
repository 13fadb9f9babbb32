"""``graphtune optimize``'s lease on a study: one process runs a study at a time.

The lease is a ``workers`` row (see ``Storage.acquire_lease``), taken in one transaction
holding the study's lock, refreshed by a heartbeat thread, released at the end. A second
process is refused with one line naming the holder (host, pid, since when) and what to do;
a dead holder's lease is taken over (stale heartbeat, pid gone from this machine, or
``take_over``).
"""

from __future__ import annotations

import os
import secrets
import socket
import threading

from graphtune.errors import StoreError
from graphtune.store.storage import LEASE_HEARTBEAT_S, LEASE_PREFIX, LEASE_STALE_S, mask_url


class StudyLease:
    """This process's lease on a study while ``optimize`` runs it (see ``Storage.acquire_lease``):
    taken on entry (``StoreError`` naming the holder when another live process runs the
    study), refreshed by a heartbeat thread, released on exit. ``check()`` raises once the
    lease was taken over by another process (this one hung past the stale timeout)."""

    def __init__(self, storage, study, *, take_over: bool = False, heartbeat_s: float | None = None,
                 stale_after_s: float | None = None):
        self.storage, self.study, self.take_over = storage, study, take_over
        self.heartbeat_s = heartbeat_s or LEASE_HEARTBEAT_S
        self.stale_after_s = stale_after_s or LEASE_STALE_S
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.name = f"{LEASE_PREFIX}{self.host}:{self.pid}:{secrets.token_hex(3)}"
        self.lost = False
        self._stop = None
        self._thread = None

    def __enter__(self) -> StudyLease:
        holder = self.storage.acquire_lease(self.study.id, self.name, self.host, self.pid, kind="optimize",
                                            stale_after_s=self.stale_after_s, take_over=self.take_over)
        if holder is not None:
            name, url = self.study.name, mask_url(self.storage.url)
            if holder.kind == "workers":
                raise StoreError(f"study {name!r} is being run by {holder.describe()}; help them with "
                                 f"`graphtune worker --study {name} --storage {url}`, or wait for them to finish")
            raise StoreError(f"study {name!r} is being run by {holder.describe()}; wait for it to finish, or if "
                             "that process is dead rerun with --take-over (its lease is taken over by itself "
                             f"{self.stale_after_s:g} s after its last heartbeat)")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="graphtune-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.storage.renew_lease(self.study.id, self.name):
                    self.lost = True
                    return
            except Exception:  # a missed beat only risks a takeover, which check() reports
                pass

    def check(self) -> None:
        if self.lost:
            raise StoreError(f"study {self.study.name!r} was taken over by another process (this one missed its "
                             f"heartbeats for {self.stale_after_s:g} s); finished trials are stored, and that "
                             "process continues the study")

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.storage.release_lease(self.study.id, self.name)
        except Exception:
            if exc[0] is None:
                raise
