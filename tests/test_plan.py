"""Pure per-file decisions: quick check, after-hash action, remote resolution, errors, missing paths."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from syncd.api.models import FileResponse
from syncd.manifest import Entry, RemoteRef, State
from syncd.plan import (
    RETRY_CAP_SECONDS,
    ErrorKind,
    Failed,
    Forget,
    Keep,
    MarkDeleted,
    MarkMissing,
    NeedRemote,
    RemoteFileLike,
    Restat,
    Retry,
    Reuse,
    StatKey,
    Unchanged,
    Upload,
    after_hash,
    needs_hash,
    on_missing,
    on_upload_error,
    resolve,
    retry_delay,
    reuse_local,
)

PURPOSES = ("assistants", "vision", "fine-tune")
stat_keys = st.builds(
    StatKey,
    st.integers(0, 2**40),
    st.integers(-(2**62), 2**62),
    st.integers(-(2**62), 2**62),
    st.integers(0, 2**64 - 1),
)
states = st.sampled_from(State)
digests = st.sampled_from(("a" * 32, "b" * 32, "c" * 32))
ids = st.sampled_from(("file-1", "file-2", "file-3", "file-4"))
times = st.floats(0, 2e9, allow_nan=False)


@st.composite
def entries(draw: st.DrawFn) -> Entry:
    return Entry(
        root_id=1,
        relpath="a/b.pdf",
        stat=draw(stat_keys),
        xxh3=draw(digests),
        md5=draw(digests),
        purpose=draw(st.sampled_from(PURPOSES)),
        state=draw(states),
        remote_id=draw(st.none() | ids),
        owned=draw(st.booleans()),
        remote_created_at=draw(st.none() | times),
        attempts=draw(st.integers(0, 50)),
        next_attempt_at=draw(st.none() | times),
        last_error=None,
        updated_at=draw(times),
        missing_since=draw(st.none() | times),
    )


@dataclass(frozen=True)
class Hit:
    id: str
    purpose: str
    created_at: datetime
    md5: str | None


hits = st.builds(
    Hit,
    ids,
    st.sampled_from(PURPOSES),
    st.datetimes(min_value=datetime(2001, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(UTC)),
    st.none() | digests,
)
refs = st.lists(st.builds(RemoteRef, ids, st.none() | times), max_size=4)
owned_sets = st.frozensets(ids)


# quick check


@given(stat_keys, st.sampled_from([s for s in State if s is not State.DELETED]))
def test_an_unchanged_stat_key_never_hashes(key: StatKey, state: State) -> None:
    assert not needs_hash(key, state, key)


@given(st.none() | stat_keys, st.none() | states, stat_keys)
def test_any_change_unknown_row_or_deleted_row_hashes(
    known: StatKey | None, state: State | None, seen: StatKey
) -> None:
    expected = known is None or state in (None, State.DELETED) or known != seen
    assert needs_hash(known, state, seen) == expected


@given(stat_keys, st.integers(1, 10**9), st.sampled_from(("size", "mtime_ns", "ctime_ns", "inode")))
def test_each_stat_field_alone_triggers_hashing(key: StatKey, delta: int, field: str) -> None:
    moved = replace(key, **{field: getattr(key, field) + delta})
    assert needs_hash(key, State.SYNCED, moved)


# after hashing


@given(entries(), stat_keys)
def test_failed_and_expired_never_requeue_without_a_content_or_purpose_change(
    entry: Entry, seen: StatKey
) -> None:
    for state in (State.FAILED, State.EXPIRED, State.SYNCED):
        row = replace(entry, state=state)
        action = after_hash(row, seen=seen, xxh3=row.xxh3, md5=row.md5, purpose=row.purpose)
        assert action == (Unchanged() if seen == row.stat else Restat(seen))


@given(st.none() | entries(), stat_keys, digests, digests, st.sampled_from(PURPOSES))
def test_need_remote_exactly_when_new_changed_repurposed_or_pending(
    entry: Entry | None, seen: StatKey, xxh3: str, md5: str, purpose: str
) -> None:
    action = after_hash(entry, seen=seen, xxh3=xxh3, md5=md5, purpose=purpose)
    changed = entry is None or (entry.xxh3, entry.md5, entry.purpose) != (xxh3, md5, purpose)
    pending = entry is not None and entry.state in (State.QUEUED, State.UPLOADING, State.DELETED)
    assert isinstance(action, NeedRemote) == (changed or pending)
    if isinstance(action, NeedRemote):
        assert action == NeedRemote(md5, purpose)


# remote resolution


@given(digests, st.sampled_from(PURPOSES), refs, st.none() | hits, owned_sets)
def test_owned_only_for_ids_we_already_own(
    md5: str, purpose: str, local: list[RemoteRef], hit: Hit | None, owned: frozenset[str]
) -> None:
    result = resolve(md5, purpose, local, hit, owned)
    if isinstance(result, Reuse):
        assert result.owned == (result.remote_id in owned)
        candidates = {r.remote_id for r in local} | ({hit.id} if hit else set())
        assert result.remote_id in candidates
    else:
        assert result == Upload(md5, purpose)


@given(digests, st.sampled_from(PURPOSES), refs, st.none() | hits, owned_sets)
def test_local_copies_win_without_network(
    md5: str, purpose: str, local: list[RemoteRef], hit: Hit | None, owned: frozenset[str]
) -> None:
    result = resolve(md5, purpose, local, hit, owned)
    assert (isinstance(result, Reuse) and result.source == "manifest") == bool(local)
    assert reuse_local(local, owned) == (result if local else None)


@given(refs.filter(bool), owned_sets)
def test_an_owned_local_copy_is_preferred(local: list[RemoteRef], owned: frozenset[str]) -> None:
    chosen = reuse_local(local, owned)
    assert chosen is not None
    if any(r.remote_id in owned for r in local):
        assert chosen.owned


@given(digests, st.sampled_from(PURPOSES), hits, owned_sets)
def test_a_hit_counts_only_with_the_same_purpose_and_md5(
    md5: str, purpose: str, hit: Hit, owned: frozenset[str]
) -> None:
    result = resolve(md5, purpose, [], hit, owned)
    if hit.purpose == purpose and hit.md5 in (None, md5):
        assert result == Reuse(hit.id, hit.id in owned, hit.created_at.timestamp(), "remote")
    else:
        assert result == Upload(md5, purpose)


def test_rename_keeps_ownership_and_foreign_hits_are_adopted() -> None:
    when = datetime(2026, 5, 1, tzinfo=UTC)
    ours = Hit("file-1", "vision", when, None)
    assert resolve("m", "vision", [], ours, {"file-1"}) == Reuse("file-1", True, when.timestamp(), "remote")
    theirs = Hit("file-9", "vision", when, "m")
    assert resolve("m", "vision", [], theirs, {"file-1"}) == Reuse(
        "file-9", False, when.timestamp(), "remote"
    )
    assert resolve("m", "vision", [], None, {"file-1"}) == Upload("m", "vision")


def test_the_api_file_response_is_a_remote_hit() -> None:
    response = FileResponse(
        id="file-7", bytes=3, purpose="vision", created_at=datetime(2026, 1, 2, tzinfo=UTC), md5="m"
    )
    hit: RemoteFileLike = response
    assert resolve("m", "vision", [], hit, set()) == Reuse(
        "file-7", False, hit.created_at.timestamp(), "remote"
    )


# upload errors


@given(st.integers(0, 200), times, st.text(max_size=20))
def test_permanent_errors_fail_and_retryable_ones_back_off_capped(
    attempts: int, now: float, why: str
) -> None:
    assert on_upload_error(ErrorKind.PERMANENT, why, attempts=attempts, now=now) == Failed(why)
    action = on_upload_error(ErrorKind.RETRYABLE, why, attempts=attempts, now=now)
    assert isinstance(action, Retry)
    assert action.error == why
    assert now < action.next_attempt_at <= now + RETRY_CAP_SECONDS


@given(st.integers(0, 200))
def test_backoff_grows_until_the_cap(attempts: int) -> None:
    assert retry_delay(attempts) <= retry_delay(attempts + 1) <= RETRY_CAP_SECONDS
    assert retry_delay(0, base=2, cap=100) == 2
    assert retry_delay(3, base=2, cap=100) == 16
    assert retry_delay(10, base=2, cap=100) == 100


# missing paths


@given(entries(), times, st.floats(0, 10**6, allow_nan=False))
def test_missing_rows_are_deleted_only_after_the_grace(entry: Entry, now: float, grace: float) -> None:
    action = on_missing(entry, now, grace)
    since = entry.missing_since if entry.missing_since is not None else now
    if entry.state is State.DELETED:
        assert action == Keep()
    elif isinstance(action, MarkDeleted | Forget):
        assert now - since >= grace
        assert entry.state is not State.UPLOADING
        assert isinstance(action, MarkDeleted) == (entry.state is State.SYNCED)
    elif entry.missing_since is None:
        assert action == MarkMissing(now)
    else:
        assert action == Keep()
        assert now - since < grace or entry.state is State.UPLOADING


@given(entries())
def test_a_missing_synced_row_goes_through_missing_then_deleted(entry: Entry) -> None:
    row = replace(entry, state=State.SYNCED, missing_since=None)
    assert on_missing(row, 1000.0, 60.0) == MarkMissing(1000.0)
    row = replace(row, missing_since=1000.0)
    assert on_missing(row, 1059.0, 60.0) == Keep()
    assert on_missing(row, 1060.0, 60.0) == MarkDeleted()
    assert on_missing(replace(row, state=State.UPLOADING), 5000.0, 60.0) == Keep()
    assert on_missing(replace(row, missing_since=None), 1000.0, 0.0) == MarkDeleted()
