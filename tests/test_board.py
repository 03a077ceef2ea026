"""The workers' board (issue 22): a full worker defers only to a worker that accepts and has room."""
import os

import pytest

from bus_containers_provider.board import Board


@pytest.fixture
def board():
    return Board(seats=4)


def test_a_worker_is_full_at_its_capacity_only_while_another_has_room(board):
    first, second = board.seat(3), board.seat(3)
    first.hold(0)
    second.hold(2)
    assert not first.full(2)
    assert first.full(3)
    second.hold(3)
    assert not first.full(3), "every worker full: all accept again"
    second.hold(2)
    assert first.full(4)


def test_a_worker_not_accepting_offers_no_room(board):
    first, second = board.seat(3), board.seat(3)
    first.hold(3)
    assert not first.full(3), "the second was handed out but accepts nothing yet"
    second.hold(0)
    assert first.full(3)
    second.leave()
    assert not first.full(3), "a stopping worker takes no more connections"


def test_each_worker_is_measured_against_its_own_capacity(board):
    first, second = board.seat(2), board.seat(10)
    second.hold(5)
    assert first.full(2)
    second.hold(10)
    assert not first.full(2)


def test_a_released_seat_goes_to_the_replacement_and_seats_run_out(board):
    seats = [board.seat(3) for _ in range(4)]
    assert board.seat(3) is None
    seats[1].hold(0)
    seats[1].release()
    assert not seats[0].full(3), "an exited worker offers no room"
    replacement = board.seat(3)
    assert replacement.index == 1


def test_a_forked_worker_writes_where_the_others_read(board):
    mine, forked = board.seat(3), board.seat(3)
    pid = os.fork()
    if pid == 0:  # the child writes its seat and leaves at once
        forked.hold(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert mine.full(3)
