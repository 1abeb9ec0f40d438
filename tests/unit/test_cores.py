"""The core budget that every worker of one gateway shares (gallama_kernel.cores)."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from gallama_kernel import cores
from gallama_kernel.cores import ADAPTIVE, CoreBoard, CoreShare, machine_cores, split


def test_split_divides_the_cores_among_busy_workers():
    assert split(2, bytes(4), 0) == 2  # alone: every core
    assert split(2, bytes([ADAPTIVE, 0]), 0) == 2
    assert split(2, bytes([ADAPTIVE, ADAPTIVE]), 0) == 1
    assert split(2, bytes([ADAPTIVE, ADAPTIVE]), 1) == 1
    assert split(2, bytes([ADAPTIVE, 0, 0]), 2) == 1  # an idle seat asks what it would get once busy
    assert [split(5, bytes([ADAPTIVE] * 3), seat) for seat in range(3)] == [2, 2, 1]  # the lower seats first
    assert split(2, bytes([ADAPTIVE] * 4), 3) == 1  # never fewer than one thread
    assert split(8, bytes([ADAPTIVE, 3, 0, 2]), 0) == 3  # fixed demands are taken first
    assert split(2, bytes([5, 0]), 1) == 1
    assert split(4, b"", None) == 4


def test_machine_cores_reads_the_override_the_affinity_and_the_cgroup_quota(monkeypatch, tmp_path: Path):
    quota_cores = cores._quota_cores
    monkeypatch.setenv(cores.CORES_ENV, "3")
    assert machine_cores() == 3
    monkeypatch.setenv(cores.CORES_ENV, "nonsense")
    monkeypatch.setattr(cores, "_quota_cores", lambda: None)
    assert machine_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(cores, "_quota_cores", lambda: 1)
    assert machine_cores() == 1
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert quota_cores(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert quota_cores(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert quota_cores(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    assert quota_cores(tmp_path) == 3


def _hold_in_child(board: str, seat: int, ready, done) -> None:  # runs in another process
    share = CoreShare(2, Path(board), seat)
    share.hold(1)
    ready.set()
    done.wait(30)
    share.release(1)


def test_workers_see_each_other_through_the_board():
    board = CoreBoard(cores=2)
    try:
        first, second = board.take(), board.take()
        assert (first, second) == (0, 1)
        env = board.env(first)
        assert env[cores.BOARD_ENV] == str(board.path) and env[cores.SEAT_ENV] == "0" and env[cores.CORES_ENV] == "2"
        assert oct(board.path.stat().st_mode & 0o777) == "0o600"
        mine = CoreShare(2, board.path, first)
        assert mine.shared and mine.threads() == 2
        context = multiprocessing.get_context("spawn")
        ready, done = context.Event(), context.Event()
        child = context.Process(target=_hold_in_child, args=(str(board.path), second, ready, done))
        child.start()
        try:
            assert ready.wait(30)
            assert board.busy() == [ADAPTIVE]
            mine.hold(7)
            assert mine.threads() == 1 and board.busy() == [ADAPTIVE, ADAPTIVE]
        finally:
            done.set()
            child.join(30)
        assert mine.threads() == 2  # the other went idle: all cores again
        mine.release(7)
        assert board.busy() == []
    finally:
        board.close()
    assert not board.path.exists()


def test_fixed_holders_write_their_demand_and_a_dead_workers_seat_is_cleared():
    board = CoreBoard(cores=4)
    try:
        seat = board.take()
        share = CoreShare(4, board.path, seat)
        share.hold(1, fixed=3)
        share.hold(2, fixed=2)
        assert board.busy() == [5]
        other = CoreShare(4, board.path, board.take())
        assert other.threads() == 1  # 4 cores, 5 taken by fixed demands: still one thread
        share.hold(3)  # an adaptive engine in the same process makes the seat adaptive
        assert board.busy() == [ADAPTIVE] and other.threads() == 2
        board.clear(seat)  # the gateway saw the worker's process end
        assert board.busy() == [] and other.threads() == 4
        board.give_back(seat)
        assert board.take() == seat
    finally:
        board.close()


def test_without_a_gateway_a_process_has_every_core(monkeypatch):
    monkeypatch.delenv(cores.BOARD_ENV, raising=False)
    monkeypatch.setattr(cores, "_share", None)
    share = cores.core_share()
    assert not share.shared and share.threads() == machine_cores()
    share.hold(1)
    share.release(1)
    assert cores.core_share() is share


@pytest.mark.parametrize("seat", ["x", "999", "-1"])
def test_a_bad_seat_shares_nothing(tmp_path: Path, seat: str):
    board = CoreBoard(cores=2)
    try:
        share = CoreShare(2, board.path, int(seat) if seat.lstrip("-").isdigit() else None)
        assert not share.shared and share.threads() == 2
        assert not CoreShare(2, tmp_path / "missing", 0).shared
    finally:
        board.close()
