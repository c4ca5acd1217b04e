"""Debounce: the Aggregator under a fake clock (hypothesis), and the async stage on real files."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.plan import HintKind, PathHint
from syncd.scan import FileStat, StatError, stat_path
from syncd.settle import (
    Aggregator,
    Gone,
    Key,
    Observation,
    Ready,
    Rescan,
    Settled,
    StatFailed,
    settle_stage,
)

Q = 1.0  # quiet period used throughout
D = 6.0  # max_delay
EPOCH = 1_700_000_000.0  # the fake wall clock reads EPOCH + monotonic time


def _ns(t: float) -> int:
    return round((EPOCH + t) * 1e9)


def _stat(version: int, inode: int = 1, changed: float = 0.0) -> FileStat:
    """Content ``version`` (also its size), last changed at monotonic time ``changed``."""
    return FileStat(size=version, mtime_ns=_ns(changed), ctime_ns=_ns(changed), inode=inode, device=1)


@dataclass
class Sim:
    """Drives an Aggregator exactly at its deadlines against a fake file system."""

    agg: Aggregator
    fs: dict[Key, FileStat] = field(default_factory=dict)
    stat: Callable[[Key, float], Observation] | None = None
    log: list[tuple[Literal["note", "out"], float, Key, Settled | HintKind]] = field(default_factory=list)
    version: int = 0

    def observe(self, key: Key, now: float) -> Observation:
        return self.stat(key, now) if self.stat is not None else self.fs.get(key)

    def process(self, now: float) -> list[Settled]:
        batch = self.agg.due(now)
        outs: list[Settled] = list(batch.rescans)
        for key in batch.checks:
            result = self.agg.checked(key, self.observe(key, now), now, EPOCH + now)
            if result is not None:
                outs.append(result)
        outs.sort(key=lambda r: isinstance(r, Gone))
        for out in outs:
            self.log.append(("out", now, (out.root_index, out.relpath), out))
        return outs

    def outputs(self) -> list[tuple[float, Settled]]:
        """(time rounded to µs, result) of everything emitted so far."""
        return [(round(t, 6), w) for kind, t, _, w in self.log if kind == "out" and not isinstance(w, str)]

    def run_until(self, limit: float) -> list[Settled]:
        outs: list[Settled] = []
        for _ in range(100_000):
            deadline = self.agg.next_deadline()
            if deadline is None or deadline > limit:
                return outs
            outs.extend(self.process(deadline))
        raise AssertionError("the aggregator never ran out of deadlines")

    def event(self, key: Key, kind: HintKind, now: float) -> None:
        """Apply the event's effect to the fake file system, then note it."""
        self.run_until(now)
        stat = None
        if kind == "deleted":
            self.fs.pop(key, None)
        elif kind in ("created", "modified", "moved_in", "attrib"):
            self.version += 1
            self.fs[key] = _stat(self.version, changed=now)
        elif kind == "scanned":
            stat = self.fs.get(key)
            if stat is None:
                return  # a scan only reports files it found
        self.log.append(("note", now, key, kind))
        self.agg.note(key, kind, now, EPOCH + now, stat)


# -- the Aggregator, pure -----------------------------------------------------------------


def test_closed_file_whose_mtime_is_old_is_ready_at_its_first_check() -> None:
    sim = Sim(Aggregator(Q, D))
    key = (0, "scan.pdf")
    timeline: list[tuple[float, HintKind]] = [(0.0, "created"), (0.1, "modified"), (0.5, "closed")]
    for t, kind in timeline:
        sim.event(key, kind, t)
    assert sim.agg.next_deadline() == pytest.approx(1.5)
    outs = sim.run_until(100)
    assert outs == [Ready(0, "scan.pdf", sim.fs[key])]
    assert sim.log[-1][1] == pytest.approx(1.5)  # one stat, Q after the close: last written 1.4 s before
    assert sim.agg.next_deadline() is None
    assert len(sim.agg) == 0


def test_a_file_changed_less_than_q_before_its_first_check_waits_until_it_is_q_old() -> None:
    sim = Sim(Aggregator(Q, D))
    key = (0, "mmapped.db")
    sim.event(key, "closed", 0.0)
    sim.fs[key] = _stat(5, changed=0.6)  # a change no event told about (mmap, a lost event)
    assert sim.run_until(1.0) == []  # first check at Q: only 0.4 s old, recorded
    assert sim.agg.next_deadline() == pytest.approx(1.6)  # checked again when it turns Q old...
    sim.fs[key] = _stat(6, changed=1.2)  # ...but it changed again meanwhile
    sim.run_until(100)
    assert sim.outputs() == [(2.2, Ready(0, "mmapped.db", _stat(6, changed=1.2)))]


def test_a_future_mtime_never_counts_as_old() -> None:
    sim = Sim(Aggregator(Q, D))
    key = (0, "from-a-share-whose-clock-runs-ahead.pdf")
    sim.fs[key] = _stat(5, changed=100.0)
    sim.event(key, "closed", 0.0)
    sim.run_until(100)
    assert sim.outputs() == [(2 * Q, Ready(0, key[1], _stat(5, changed=100.0)))]  # two equal stats


@settings(max_examples=100, deadline=None)
@given(ahead=st.floats(min_value=1e-6, max_value=1e9), now=st.floats(min_value=Q, max_value=1e6))
def test_a_future_mtime_is_never_ready_at_the_first_stat(ahead: float, now: float) -> None:
    agg = Aggregator(Q, D)
    agg.note((0, "f"), "closed", 0.0, EPOCH)
    assert agg.due(now).checks == [(0, "f")]
    assert agg.checked((0, "f"), _stat(5, changed=now + ahead), now, EPOCH + now) is None


def test_an_empty_file_needs_two_stats() -> None:
    sim = Sim(Aggregator(Q, D))
    key = (0, "scanimage-warming-up.tif")
    sim.event(key, "created", 0.0)  # the shell created it; the first write is seconds away
    empty = FileStat(size=0, mtime_ns=_ns(0.0), ctime_ns=_ns(0.0), inode=9, device=1)
    sim.fs[key] = empty
    sim.run_until(100)
    assert sim.outputs() == [(2 * Q, Ready(0, key[1], empty))]


def test_writer_without_close_is_checked_at_max_delay_then_ready_if_old() -> None:
    sim = Sim(Aggregator(Q, D))
    key = (0, "open-forever.log")
    sim.event(key, "modified", 0.0)
    assert sim.agg.next_deadline() == pytest.approx(D)  # no close expected before D
    sim.run_until(100)
    assert sim.outputs() == [(D, Ready(0, "open-forever.log", sim.fs[key]))]


def test_a_close_after_modify_makes_it_ready_without_waiting_for_max_delay() -> None:
    sim = Sim(Aggregator(Q, D))
    key = (0, "f")
    sim.event(key, "modified", 0.0)
    sim.event(key, "closed", 0.3)
    sim.run_until(100)
    assert sim.log[-1][1] == pytest.approx(1.3)


def test_hard_link_create_counts_as_complete_but_a_later_write_does_not() -> None:
    sim = Sim(Aggregator(Q, D))
    sim.event((0, "linked.pdf"), "created", 0.0)  # link(): IN_CREATE and nothing else
    sim.event((0, "written.pdf"), "created", 0.0)
    sim.event((0, "written.pdf"), "modified", 0.1)  # open(O_CREAT) then a write, still open
    sim.run_until(D - 0.01)
    assert sim.outputs() == [(Q, Ready(0, "linked.pdf", sim.fs[(0, "linked.pdf")]))]


def test_a_file_that_never_stops_changing_is_rechecked_every_quiet_and_never_dropped() -> None:
    changing_until = 20.0

    def stat(key: Key, now: float) -> Observation:
        last_change = min(now, changing_until)
        return _stat(int(last_change * 1000), changed=last_change)

    sim = Sim(Aggregator(Q, D), stat=stat)
    sim.event((0, "growing.tif"), "modified", 0.0)
    outs = sim.run_until(1000)
    ready = sim.outputs()
    assert len(outs) == 1
    assert ready[0][0] >= changing_until + Q
    assert ready[0][0] <= changing_until + 2 * Q
    assert ready[0][1] == Ready(0, "growing.tif", _stat(20_000, changed=changing_until))


def test_rename_emits_the_new_path_before_deleting_the_old_one() -> None:
    sim = Sim(Aggregator(Q, D))
    sim.fs[(0, "old.pdf")] = _stat(7, inode=42)
    sim.event((0, "old.pdf"), "deleted", 0.0)
    sim.fs[(0, "new.pdf")] = _stat(7, inode=42)
    sim.agg.note((0, "new.pdf"), "moved_in", 0.0, EPOCH)
    sim.run_until(100)
    assert sim.outputs() == [
        (Q, Ready(0, "new.pdf", _stat(7, inode=42))),
        (3 * Q, Gone(0, "old.pdf")),
    ]


def test_deleted_then_recreated_is_ready_not_gone() -> None:
    sim = Sim(Aggregator(Q, D))
    key = (0, "f")
    sim.event(key, "deleted", 0.0)
    sim.event(key, "created", 0.2)
    sim.run_until(100)
    assert [w for _, w in sim.outputs()] == [Ready(0, "f", sim.fs[key])]


def test_a_file_that_vanishes_without_a_delete_event_is_held_then_gone() -> None:
    sim = Sim(Aggregator(Q, D))
    key = (0, "tmpfile")
    sim.event(key, "closed", 0.0)  # never existed in the fake fs: gone at the first check
    sim.run_until(100)
    assert sim.outputs() == [(3 * Q, Gone(0, "tmpfile"))]


def test_stat_errors_are_reported_once() -> None:
    sim = Sim(Aggregator(Q, D), stat=lambda key, now: StatError("EACCES: Permission denied"))
    sim.event((0, "f"), "closed", 0.0)
    assert sim.run_until(100) == [StatFailed(0, "f", "EACCES: Permission denied")]
    assert len(sim.agg) == 0


def test_scanned_hint_with_stat_is_checked_when_the_change_it_saw_turns_q_old() -> None:
    sim = Sim(Aggregator(Q, D))
    key = (0, "found-by-scan.pdf")
    sim.fs[key] = _stat(3, changed=9.7)
    sim.agg.note(key, "scanned", 10.0, EPOCH + 10.0, _stat(3, changed=9.7))
    assert sim.run_until(100) == [Ready(0, "found-by-scan.pdf", _stat(3, changed=9.7))]
    assert sim.log[-1][1] == pytest.approx(9.7 + Q)  # one more stat, not Q after the scan


def test_scanned_hint_without_a_stat_is_ready_at_its_first_check_if_old() -> None:
    sim = Sim(Aggregator(Q, D))
    key = (0, "polled.pdf")
    sim.fs[key] = _stat(3, changed=9.7)
    sim.agg.note(key, "scanned", 10.0, EPOCH + 10.0)  # a polling watcher: no stat, no close events
    sim.run_until(100)
    assert sim.outputs() == [(10.0 + Q, Ready(0, "polled.pdf", _stat(3, changed=9.7)))]


def test_a_scanned_page_by_page_file_is_ready_q_after_its_last_page() -> None:
    def stat(key: Key, now: float) -> Observation:
        page = min(int(now / 0.4), 10)  # a page every 0.4 s, ten pages, never closed (polling)
        return _stat(page + 1, changed=page * 0.4)

    sim = Sim(Aggregator(Q, D), stat=stat)
    sim.agg.note((0, "scan.tif"), "scanned", 0.0, EPOCH, _stat(1, changed=0.0))
    sim.run_until(100)
    assert sim.outputs() == [(4.0 + Q, Ready(0, "scan.tif", _stat(11, changed=4.0)))]


def test_scan_does_not_override_a_live_write_in_progress() -> None:
    sim = Sim(Aggregator(Q, D))
    key = (0, "f")
    sim.event(key, "modified", 0.0)
    sim.event(key, "scanned", 0.5)
    assert sim.agg.next_deadline() == pytest.approx(D)


def test_per_root_quiet_periods() -> None:
    sim = Sim(Aggregator({0: 1.0, 1: 5.0}, 60.0))
    sim.event((0, "a"), "closed", 0.0)
    sim.event((1, "a"), "closed", 0.0)
    sim.fs[(0, "a")] = sim.fs[(1, "a")] = _stat(1)
    sim.run_until(1000)
    assert sim.outputs() == [(1.0, Ready(0, "a", _stat(1))), (5.0, Ready(1, "a", _stat(1)))]


def test_many_events_in_one_directory_collapse_into_one_rescan() -> None:
    sim = Sim(Aggregator(Q, D, collapse_threshold=50))
    for i in range(60):
        sim.event((0, f"inbox/page{i:03}.tif"), "created", i * 0.01)
    sim.event((0, "inbox/late.tif"), "closed", 0.9)  # absorbed into the pending rescan
    sim.event((0, "elsewhere.pdf"), "closed", 0.9)
    assert len(sim.agg) == 2
    outs = sim.run_until(100)
    assert Rescan(0, "inbox") in outs
    assert [o for o in outs if o.relpath.startswith("inbox/")] == []
    assert [o.relpath for o in outs] == ["inbox", "elsewhere.pdf"]


def test_explicit_rescan_absorbs_pending_and_later_events_below_it() -> None:
    sim = Sim(Aggregator(Q, D))
    sim.event((0, "a/b/c/early.pdf"), "created", 0.0)
    sim.agg.note((0, "a"), "rescan", 0.1, EPOCH + 0.1)  # mkdir -p a/b/c: files inside may have been missed
    sim.event((0, "a/b/c/late.pdf"), "closed", 0.2)
    sim.agg.note((0, "a/b"), "rescan", 0.3, EPOCH + 0.3)
    assert sim.run_until(100) == [Rescan(0, "a")]
    assert sim.log[-1][1] == pytest.approx(0.3 + Q)


def test_max_pending_collapses_to_a_rescan_of_each_root() -> None:
    sim = Sim(Aggregator(Q, D, max_pending=20))
    for i in range(15):
        sim.event((0, f"d{i}/f"), "created", 0.0)
        sim.event((1, f"d{i}/f"), "created", 0.0)
    assert sorted(sim.run_until(100), key=lambda r: r.root_index) == [Rescan(0, ""), Rescan(1, "")]


def test_invalid_periods_are_rejected() -> None:
    with pytest.raises(ValueError, match="positive"):
        Aggregator(0.0, 10.0)


# -- hypothesis: for any event sequence ---------------------------------------------------

KEYS = [(0, "a"), (0, "b"), (0, "d/c"), (1, "a")]
KINDS: list[HintKind] = ["created", "modified", "closed", "moved_in", "attrib", "deleted", "scanned"]
events_strategy = st.lists(
    st.tuples(
        st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=2.5 * Q, allow_nan=False)),
        st.sampled_from(KEYS),
        st.sampled_from(KINDS),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(events=events_strategy)
def test_every_noted_key_is_emitted_exactly_once_per_burst_and_never_early(
    events: list[tuple[float, Key, HintKind]],
) -> None:
    sim = Sim(Aggregator(Q, D))
    now = 0.0
    for dt, key, kind in events:
        now += dt
        sim.event(key, kind, now)
    sim.run_until(float("inf"))

    assert len(sim.agg) == 0
    assert sim.agg.next_deadline() is None
    for key in {k for record, _, k, _ in sim.log if record == "note"}:
        history = [(record, t, what) for record, t, k, what in sim.log if k == key]
        burst: list[float] = []  # when each note of the burst was made
        changes: list[float] = []  # when the change each note reports happened
        last_change = 0.0
        for record, t, what in history:
            if record == "note":
                # A scan reports the file's last change, which may be older than the scan itself.
                if what != "scanned":
                    last_change = t
                burst.append(t)
                changes.append(last_change if what == "scanned" else t)
                continue
            assert burst, f"{key} emitted twice without an event in between: {history}"
            early = t < max(changes) + Q - 1e-6 and t < burst[0] + D - 1e-6
            assert not early, f"{key} emitted early: {history}"
            burst, changes = [], []
        assert not burst, f"{key} had events after its last output: {history}"
        for _, t, what in history:
            if isinstance(what, Ready):  # unchanged for Q when it was handed on
                assert t >= what.stat.mtime_ns / 1e9 - EPOCH + Q - 1e-6, f"{key} not stable: {history}"
        final = history[-1][2]
        expected = Ready(key[0], key[1], sim.fs[key]) if key in sim.fs else Gone(*key)
        assert final == expected


def _covers(out: Settled | HintKind, key: Key) -> bool:
    if isinstance(out, str) or out.root_index != key[0]:
        return False
    if out.relpath == key[1]:
        return True
    return isinstance(out, Rescan) and (out.relpath == "" or key[1].startswith(out.relpath + "/"))


COLLAPSE_KEYS = [(0, f"d/x{i}") for i in range(5)] + [(0, "d/sub/y"), (0, "e/z"), (1, "d/x0")]


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=2.0 * Q, allow_nan=False),
            st.sampled_from([*COLLAPSE_KEYS, (0, "d"), (0, "e")]),
            st.sampled_from([*KINDS, "rescan"]),
        ),
        max_size=40,
    )
)
def test_with_collapsing_every_key_is_still_covered_after_its_last_event(
    events: list[tuple[float, Key, HintKind]],
) -> None:
    sim = Sim(Aggregator(Q, D, collapse_threshold=2))
    now = 0.0
    for dt, key, kind in events:
        now += dt
        if kind == "rescan" or key[1] not in ("d", "e"):
            sim.event(key, kind, now)
    sim.run_until(float("inf"))

    assert len(sim.agg) == 0
    last_note = {k: i for i, (kind, _, k, _) in enumerate(sim.log) if kind == "note"}
    for key, index in last_note.items():
        later = [what for kind, _, _, what in sim.log[index + 1 :] if kind == "out"]
        assert any(_covers(o, key) for o in later), f"{key} not covered after its last event: {sim.log}"


# -- the async stage ----------------------------------------------------------------------


class FakeClock:
    """Virtual time: ``sleep`` advances it at once, so the stage runs as fast as it can."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)
        await asyncio.sleep(0)


class StampedQueue(asyncio.Queue[Settled]):
    """Records the virtual time at which each result was emitted."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(maxsize=100)
        self.clock = clock
        self.stamps: list[tuple[float, Settled]] = []

    def _put(self, item: Settled) -> None:
        self.stamps.append((self.clock.now, item))
        super()._put(item)


def _real_stat(path: Path) -> FileStat:
    st = stat_path(str(path))
    assert isinstance(st, FileStat)
    return st


async def _collect(out: asyncio.Queue[Settled], n: int) -> list[Settled]:
    return [await asyncio.wait_for(out.get(), timeout=10) for _ in range(n)]


def test_stage_on_real_files_with_a_fake_clock(tmp_path: Path) -> None:
    (tmp_path / "done.pdf").write_bytes(b"complete")
    (tmp_path / "renamed.pdf").write_bytes(b"moved here")
    (tmp_path / "sub").mkdir()
    found = tmp_path / "sub" / "found.pdf"
    found.write_bytes(b"by scan")
    files = [tmp_path / "done.pdf", tmp_path / "renamed.pdf", found]
    # The fake wall clock starts when the newest file is 0.25 s old and follows the fake clock.
    wall_start = max(max(_real_stat(f).mtime_ns, _real_stat(f).ctime_ns) for f in files) / 1e9 + 0.25
    found_age = wall_start - max(_real_stat(found).mtime_ns, _real_stat(found).ctime_ns) / 1e9
    clock = FakeClock()

    async def main() -> StampedQueue:
        hints: asyncio.Queue[PathHint] = asyncio.Queue(maxsize=100)
        out = StampedQueue(clock)
        stop = asyncio.Event()
        kinds: list[HintKind] = ["created", "modified", "modified", "closed"]
        for kind in kinds:
            hints.put_nowait(PathHint(0, "done.pdf", kind))
        hints.put_nowait(PathHint(0, "was-here.pdf", "deleted"))
        hints.put_nowait(PathHint(0, "renamed.pdf", "moved_in"))
        hints.put_nowait(PathHint(0, "sub/found.pdf", "scanned", _real_stat(found)))
        hints.put_nowait(PathHint(0, "newdir", "rescan"))
        task = asyncio.create_task(
            settle_stage(
                hints,
                out,
                aggregator=Aggregator(Q, D),
                stat=lambda root, rel: stat_path(os.path.join(tmp_path, rel)),
                clock=clock,
                wall=lambda: wall_start + clock.now,
                stop=stop,
                sleep=clock.sleep,
            )
        )
        await _collect(out, 5)
        stop.set()
        await asyncio.wait_for(task, timeout=10)
        assert out.empty()
        return out

    out = asyncio.run(main())
    assert [what for _, what in out.stamps] == [
        Ready(0, "sub/found.pdf", _real_stat(found)),
        Rescan(0, "newdir"),
        Ready(0, "done.pdf", _real_stat(tmp_path / "done.pdf")),
        Ready(0, "renamed.pdf", _real_stat(tmp_path / "renamed.pdf")),
        Gone(0, "was-here.pdf"),
    ]
    # The scan saw found.pdf 0.25 s after its last change: one more stat when it is Q old. The
    # closed and renamed files are ready at their first check, the delete is held longest.
    times = [t for t, _ in out.stamps]
    assert times == pytest.approx([Q - found_age, Q, Q, Q, 3 * Q], abs=1e-6)


def test_stage_reads_the_wall_clock_before_a_slow_stat() -> None:
    clock = FakeClock()
    wall = [EPOCH]
    changed = EPOCH + 0.5

    def slow_stat(root: int, rel: str) -> Observation:
        wall[0] += 10.0  # an NFS server taking its time: seconds pass during the stat
        change_ns = round(changed * 1e9)
        return FileStat(size=1, mtime_ns=change_ns, ctime_ns=change_ns, inode=1, device=1)

    async def main() -> StampedQueue:
        hints: asyncio.Queue[PathHint] = asyncio.Queue(maxsize=10)
        out = StampedQueue(clock)
        stop = asyncio.Event()
        hints.put_nowait(PathHint(0, "slow.pdf", "closed"))
        task = asyncio.create_task(
            settle_stage(
                hints,
                out,
                aggregator=Aggregator(Q, D),
                stat=slow_stat,
                clock=clock,
                wall=lambda: wall[0] + clock.now,
                stop=stop,
                sleep=clock.sleep,
            )
        )
        await _collect(out, 1)
        stop.set()
        await asyncio.wait_for(task, timeout=10)
        return out

    out = asyncio.run(main())
    # At the first check (Q) the file was 0.5 s old when the stat began: not ready, though it
    # looked 10.5 s old once the stat returned (ready at Q would mean the wall clock was read late).
    assert [(round(t, 6), type(what)) for t, what in out.stamps] == [(Q + 0.5, Ready)]


def test_stage_waits_out_a_file_that_keeps_changing_and_emits_it_once() -> None:
    clock = FakeClock()
    changing_until = 30.0

    def stat(root: int, rel: str) -> Observation:
        last_change = min(clock.now, changing_until)
        return _stat(int(last_change * 10), changed=last_change)

    async def main() -> StampedQueue:
        hints: asyncio.Queue[PathHint] = asyncio.Queue(maxsize=10)
        out = StampedQueue(clock)
        stop = asyncio.Event()
        hints.put_nowait(PathHint(0, "scanner-output.tif", "modified"))
        task = asyncio.create_task(
            settle_stage(
                hints,
                out,
                aggregator=Aggregator(Q, D),
                stat=stat,
                clock=clock,
                wall=lambda: EPOCH + clock.now,
                stop=stop,
                sleep=clock.sleep,
            )
        )
        await _collect(out, 1)
        # Nothing else is pending: the stage now waits for hints, and stops when asked.
        stop.set()
        await asyncio.wait_for(task, timeout=10)
        return out

    out = asyncio.run(main())
    assert len(out.stamps) == 1
    emitted_at, result = out.stamps[0]
    assert changing_until + Q <= emitted_at <= changing_until + 2 * Q
    assert result == Ready(0, "scanner-output.tif", _stat(300, changed=changing_until))
