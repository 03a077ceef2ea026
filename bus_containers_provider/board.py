"""How many connections each worker holds, in memory the gunicorn master shares with its workers.

gunicorn's workers accept from one listening socket, and whichever is awake
first takes the next connection, so a burst can fill one worker's run
capacity (its runs answered 503, CONTRACT §7) while another still has room.
Each worker writes into its own seat how many connections it holds; one that
holds as many as its run capacity stops accepting while another worker has
room, and the kernel keeps the connection queued for that one. When every
worker is full they all accept again: a request that is not a run is still
answered, and a run is still refused at once rather than queued.

The memory is an anonymous shared mapping made in the master before it forks;
each seat is written by its worker alone, and only the master hands seats out
and takes them back (pre_fork, child_exit), so no lock is needed. A reader
may see a count one event-loop turn old: the cost is at most one connection
accepted or deferred a moment early or late, never one refused below capacity.
"""
import mmap
import os
import struct
from typing import Optional

# pid (0: free; -1: handed out, its worker not accepting yet), connections held, run capacity.
_SEAT = struct.Struct("qqq")
FREE, WAITING = 0, -1
# Workers beyond this many never defer (nor are deferred to); a host runs a few per core.
SEATS = 64


class Board:
    """The master's table of seats; a worker gets its Seat in pre_fork, before it is forked."""

    def __init__(self, seats: int = SEATS):
        self.seats = seats
        self._memory = mmap.mmap(-1, _SEAT.size * seats)  # anonymous, so shared with every forked worker

    def seat(self, capacity: int) -> Optional["Seat"]:
        """A free seat for a worker about to be forked; None when all are taken (that worker never defers)."""
        for index in range(self.seats):
            if self._read(index)[0] == FREE:
                self._write(index, WAITING, 0, capacity)
                return Seat(self, index, capacity)
        return None

    def _read(self, index: int) -> tuple:
        return _SEAT.unpack_from(self._memory, index * _SEAT.size)

    def _write(self, index: int, pid: int, held: int, capacity: int) -> None:
        _SEAT.pack_into(self._memory, index * _SEAT.size, pid, held, capacity)

    def has_room(self, but: int) -> bool:
        """Whether a worker other than seat `but` accepts and holds fewer connections than its run capacity."""
        for index in range(self.seats):
            if index != but:
                pid, held, capacity = self._read(index)
                if pid > 0 and held < capacity:
                    return True
        return False


class Seat:
    """One worker's place on the board: written by that worker, handed back by the master when it exits."""

    def __init__(self, board: Board, index: int, capacity: int):
        self.board, self.index, self.capacity = board, index, capacity
        self._pid = None  # the worker's, read after fork

    def hold(self, connections: int) -> None:
        """This worker accepts and holds `connections`."""
        if self._pid is None:
            self._pid = os.getpid()
        self.board._write(self.index, self._pid, connections, self.capacity)

    def leave(self) -> None:
        """This worker accepts no more (it is stopping): nobody waits for it to take a connection."""
        self.board._write(self.index, WAITING, 0, self.capacity)

    def full(self, connections: int) -> bool:
        """Holding `connections`, this worker leaves the next one to another: it is full and another is not."""
        return connections >= self.capacity and self.board.has_room(but=self.index)

    def release(self) -> None:
        """The worker has exited (master only): the seat is free for its replacement."""
        self.board._write(self.index, FREE, 0, 0)
