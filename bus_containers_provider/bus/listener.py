"""One supervising thread per reply name: keeps its stream open and feeds the waiter registry."""
import logging
import threading
import time

from .. import metrics
from ..credentials import CHECK_SECONDS
from .client import EventsClient, EventsError, EventsRejected, envelopes, new_session

log = logging.getLogger(__name__)

# After a replacement stream is open, the old one is still read this long, so
# a reply the server was already writing to it is not cut off.
OVERLAP_SECONDS = 1.0
# A catch-up checks this often (in envelopes read) whether anything it looks for still waits.
CATCH_UP_CHECK_EVERY = 256
# While nothing in this process waits on a stream, it is read this often, in batches: every process
# gets every reply, and waking for each one that is another's cost more than reading it. A request
# that registers a waiter has it read at once again, before its own publish.
BATCH_READ_SECONDS = 0.05


class _Reader(threading.Thread):
    """Reads one open stream into the registry until it ends or is closed."""

    def __init__(self, response, reply_name: str, registry, ended):
        super().__init__(name=f"stream:{reply_name}", daemon=True)
        self.reply_name = reply_name
        self.opened = self.last_read = time.monotonic()
        self.error = None  # why it broke; None for a quiet end
        self.done = threading.Event()
        self._response = response
        self._registry = registry
        self._ended = ended
        self._closing = False

    def run(self) -> None:
        try:
            for envelope in envelopes(self._response.raw, self.reply_name, self._touch, self._registry.unwanted,
                                      self._until_wanted):
                self._registry.resolve(self.reply_name, envelope)
        except EventsError as exc:
            if not self._closing:
                log.warning("%s", exc)
                self.error = str(exc)
        except Exception:  # a bug must not end the stream silently
            log.exception("the %s stream reader failed", self.reply_name)  # pragma: no mutate
            self.error = "unexpected error"
        finally:
            self._response.close()
            self.done.set()
            self._ended()

    def _touch(self) -> None:
        self.last_read = time.monotonic()

    def _until_wanted(self) -> None:
        if not self._closing:
            self._registry.until_wanted(self.reply_name, BATCH_READ_SECONDS)

    def close(self) -> None:
        self._closing = True
        _shutdown(self._response)
        self._registry.wake(self.reply_name)  # a reader between batches ends now, not after its wait


class Listener(threading.Thread):
    """Keeps one broadcast stream open for `reply_name`, reconnecting as configured.

    A stream that ends or breaks is reopened at once; failing to open one is
    retried with exponential backoff only when `retry` is set, otherwise the
    listener stays down and fails its waiters. With retry, waiters keep
    waiting across the gap (up to their own deadlines) and new requests are
    refused until the stream is back. A stream silent for `idle_timeout` is
    replaced make-before-break. Whenever a stream (re)opens while waiters are
    pending, the stored history is read once for the replies they may have
    missed (see `_catch_up`).
    """

    def __init__(self, client: EventsClient, reply_name: str, registry, *, retry: bool,
                 retry_min: float, retry_max: float, down_grace: float, idle_timeout: float):
        super().__init__(name=f"listener:{reply_name}", daemon=True)
        self.reply_name = reply_name
        self._client = client
        self._registry = registry
        self._retry = retry
        self._retry_min, self._retry_max = retry_min, retry_max
        self._down_grace = down_grace
        self._idle_timeout = idle_timeout
        # The read timeout only backs up the idle check: a reader is replaced long before it fires.
        self._read_timeout = 2 * idle_timeout + OVERLAP_SECONDS + 10
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._connected = threading.Event()
        self._was_up = False
        self._readers = []
        self._catch_up_response = None
        self._sought = set()  # correlation ids the running catch-up looks for
        self._grace_timer = None
        # Connected state, the registry's up/down mark and the grace timer change together.
        self._state_lock = threading.RLock()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def start(self) -> None:
        metrics.listener_state(self.reply_name, False)
        self._went_down("not connected yet")
        super().start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        for reader in list(self._readers):
            reader.close()  # wakes a read blocked on a silent stream
        _shutdown(self._catch_up_response)
        self._cancel_grace()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    def run(self) -> None:
        delay, current = self._retry_min, None
        with new_session() as session:
            try:
                while not self._stopping.is_set():
                    if current is not None and not current.done.is_set():
                        idle = time.monotonic() - current.last_read
                        if idle < self._idle_timeout:
                            self._wake.wait(self._idle_timeout - idle)
                            self._wake.clear()
                            continue
                        # Silent for the whole idle timeout: open its replacement first.
                    elif current is not None:
                        lived, reason = time.monotonic() - current.opened, current.error
                        self._readers.remove(current)
                        current = None
                        self._went_down(reason or "stream ended")
                        metrics.listener_reconnected(self.reply_name)
                        if lived >= self._retry_min:
                            delay = self._retry_min  # a stream that lived: reopen it at once
                            continue
                        # One that ends as soon as it opens: back off.
                        self._stopping.wait(delay)
                        delay = min(delay * 2, self._retry_max)
                        continue
                    try:
                        response = self._client.open_stream(self.reply_name, self._read_timeout, session)
                    except EventsError as exc:
                        reason = self._refused(exc)
                        if current is None and not self._retry:
                            self._stay_down(reason)
                            return
                        metrics.listener_reconnected(self.reply_name)
                        if _unauthorized(exc):
                            self._await_another_token()
                            continue
                        self._stopping.wait(delay)
                        delay = min(delay * 2, self._retry_max)
                        continue
                    current = self._replace(current, response)
            finally:
                for reader in list(self._readers):
                    reader.close()

    def _replace(self, previous, response) -> _Reader:
        """Start reading `response`, then close `previous` after the overlap."""
        reader = _Reader(response, self.reply_name, self._registry, self._wake.set)
        self._readers.append(reader)
        # Taken once the new stream is open: every reply published from now on reaches it.
        missed = self._registry.pending_ids(self.reply_name)
        reader.start()
        self._up(replacing=previous is not None)
        if previous is not None:
            self._stopping.wait(OVERLAP_SECONDS)
            previous.close()
            previous.join(OVERLAP_SECONDS)
            self._readers.remove(previous)
        self.catch_up_later(missed)
        return reader

    def catch_up_later(self, missed: set) -> None:
        """Read the stored history for `missed` correlation ids, in the background."""
        if missed and not self._stopping.is_set():
            threading.Thread(target=self._catch_up, args=(missed,), name=f"catch-up:{self.reply_name}",
                             daemon=True).start()

    def _catch_up(self, missed: set) -> None:
        """Read the stored history once for replies published while no stream of ours was open.

        A live stream only carries what is published while it is open. Only
        pending correlation ids match (the registry ignores the rest), and the
        read ends as soon as none of `missed` still waits, so it is bounded by
        the longest of their deadlines.
        """
        with self._state_lock:
            # A newer catch-up supersedes an older one, and looks for what the older one still did.
            self._sought = {cid for cid in self._sought if self._registry.any_pending((cid,))} | missed
            missed = set(self._sought)
        _shutdown(self._catch_up_response)
        started, read, found = time.monotonic(), 0, 0
        try:
            with new_session() as session:
                response = self._client.open_stream(self.reply_name, self._read_timeout, session,
                                                    replay=True, follow=False)
                self._catch_up_response = response
                with response:
                    for envelope in envelopes(response.raw, self.reply_name):
                        read += 1
                        if self._registry.resolve(self.reply_name, envelope):
                            found += 1
                        elif read % CATCH_UP_CHECK_EVERY:
                            continue
                        if self._stopping.is_set() or not self._registry.any_pending(missed):
                            break
        except EventsError as exc:
            log.warning("catching up on %s failed: %s", self.reply_name, exc)  # pragma: no mutate
        log.info("caught up on %s: %d of %d waiting replies found in %d stored events (%.2fs)",
                 self.reply_name, found, len(missed), read, time.monotonic() - started)

    def _await_another_token(self) -> None:
        """Wait the longest backoff, or until the token source holds another token.

        A refused token is our own credential, not an outage: trying it again
        soon cannot help. A new token (a rewritten token file) is worth a try
        at once, so a rotation is taken up without waiting out the backoff.
        """
        seen = self._client.token_generation
        deadline = time.monotonic() + self._retry_max
        while (left := deadline - time.monotonic()) > 0:
            if self._stopping.wait(min(left, CHECK_SECONDS)) or self._client.token_generation != seen:
                return

    def _refused(self, exc: EventsError) -> str:
        if _unauthorized(exc):
            retrying = f"; trying again in {self._retry_max:g}s, or once the token changes" if self._retry else ""
            log.error("the Events API refused the provider's token for %s (HTTP %d)%s", self.reply_name,
                      exc.status, retrying)
        elif isinstance(exc, EventsRejected):
            log.error("%s", exc)
        elif not self._stopping.is_set():
            log.warning("%s", exc)
        return str(exc)

    def _stay_down(self, reason: str) -> None:
        log.error("the %s listener stays down (BUS_EVENTS_LISTENER_RETRY is not set)", self.reply_name)
        with self._state_lock:
            if self._was_up and self._grace_timer is not None:
                return  # a stream that dropped: its waiters fail when the down grace ends (§5)
            self._cancel_grace()  # one that never opened: refused now, nothing waits on it yet
            self._registry.mark_down(self.reply_name, reason)

    def _up(self, replacing: bool) -> None:
        with self._state_lock:
            self._cancel_grace()
            self._registry.mark_up(self.reply_name)
            self._connected.set()
            self._was_up = True
        metrics.listener_state(self.reply_name, True)
        if replacing:
            log.debug("replaced the idle %s stream", self.reply_name)  # pragma: no mutate
        else:
            log.info("listening for %s", self.reply_name)  # pragma: no mutate

    def _went_down(self, reason: str) -> None:
        with self._state_lock:
            self._connected.clear()
            self._cancel_grace()
            metrics.listener_state(self.reply_name, False)
            if self._stopping.is_set():
                return
            self._grace_timer = threading.Timer(self._down_grace, self._grace_over, args=(reason,))
            self._grace_timer.daemon = True
            self._grace_timer.start()

    def _grace_over(self, reason: str) -> None:
        with self._state_lock:
            if not self.connected and not self._stopping.is_set():
                # With retry the listener is reconnecting: waiters keep waiting for their replies.
                self._registry.mark_down(self.reply_name, reason, fail_waiting=not self._retry)

    def _cancel_grace(self) -> None:
        with self._state_lock:
            timer, self._grace_timer = self._grace_timer, None
        if timer is not None:
            timer.cancel()


def _unauthorized(exc: EventsError) -> bool:
    return isinstance(exc, EventsRejected) and exc.unauthorized


def _shutdown(response) -> None:
    """Wake a thread blocked reading `response` (closing alone does not)."""
    if response is None:
        return
    try:
        response.raw.shutdown()
    except (AttributeError, ValueError, RuntimeError, OSError):
        pass
