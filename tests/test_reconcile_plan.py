"""The reconciler's pure planner: rows + ledger + full listing + root health + now → plan."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.config import ReconcileConfig
from syncd.manifest import Entry, FileKey, OwnedRemote, State, StatKey
from syncd.reconcile import (
    FRACTION_MIN_DELETES,
    Plan,
    Prune,
    Release,
    RemoteFile,
    Requeue,
    Why,
    plan_reconcile,
)

NOW = 1_800_000_000.0
DAY = 86400.0
STAT = StatKey(3, 1, 1, 7)


def row(
    relpath: str,
    state: State,
    remote_id: str | None = None,
    *,
    root_id: int = 1,
    md5: str = "m",
    purpose: str = "assistants",
    missing_since: float | None = None,
    updated_at: float = NOW - 10,
    remote_created_at: float | None = None,
) -> Entry:
    return Entry(
        root_id,
        relpath,
        STAT,
        "x" + md5,
        md5,
        purpose,
        state,
        remote_id,
        False,
        remote_created_at,
        0,
        None,
        None,
        updated_at,
        missing_since,
    )


def ledger_for(rows: Iterable[Entry], owned: Mapping[str, float | None]) -> list[OwnedRemote]:
    rows = list(rows)
    return [
        OwnedRemote(rid, created, sum(1 for e in rows if e.remote_id == rid and e.state is State.SYNCED))
        for rid, created in sorted(owned.items())
    ]


def listed(*ids: str, created_at: float = NOW - DAY, purpose: str = "assistants") -> dict[str, RemoteFile]:
    return {rid: RemoteFile(rid, purpose, created_at) for rid in ids}


def plan(
    rows: Sequence[Entry],
    owned: Mapping[str, float | None],
    listing: Mapping[str, RemoteFile],
    *,
    unavailable: Mapping[int, str] | None = None,
    confirm: bool = False,
    now: float = NOW,
    **config: Any,
) -> Plan:
    return plan_reconcile(
        rows,
        ledger_for(rows, owned),
        listing,
        settings=ReconcileConfig(**config),
        unavailable=unavailable or {},
        now=now,
        confirm=confirm,
    )


def k(relpath: str, root_id: int = 1) -> FileKey:
    return FileKey(root_id, relpath)


# the cases, one by one


def test_deleted_owned_file_is_pruned_and_its_row_dropped() -> None:
    p = plan([row("a", State.DELETED, "r1")], {"r1": NOW - DAY}, listed("r1"))
    assert p.actions == (Prune("r1", Why.DELETED, True, remove=(k("a"),)),)


def test_deleted_adopted_file_is_released_never_pruned() -> None:
    p = plan([row("a", State.DELETED, "r1")], {}, listed("r1"))
    assert p.actions == (Release("r1", Why.NOT_OURS, (k("a"),)),)


def test_file_still_held_by_another_path_is_released_not_pruned() -> None:
    rows = [row("a", State.DELETED, "r1"), row("b", State.SYNCED, "r1")]
    p = plan(rows, {"r1": NOW - DAY}, listed("r1"))
    assert p.actions == (Release("r1", Why.STILL_HELD, (k("a"),)),)


def test_two_deleted_paths_of_one_remote_file_make_one_prune() -> None:
    rows = [row("a", State.DELETED, "r1"), row("b", State.DELETED, "r1", root_id=2)]
    p = plan(rows, {"r1": NOW - DAY}, listed("r1"))
    assert p.actions == (Prune("r1", Why.DELETED, True, remove=(k("a"), k("b", 2))),)


def test_upload_only_releases_and_forgets_instead_of_pruning() -> None:
    rows = [row("a", State.DELETED, "r1")]
    p = plan(rows, {"r1": NOW - DAY, "old": NOW - DAY}, listed("r1", "old"), prune_deleted=False)
    assert set(p.actions) == {
        Release("r1", Why.UPLOAD_ONLY, (k("a"),), forget=True),
        Release("old", Why.UPLOAD_ONLY, (), forget=True),
    }


def test_old_version_nobody_holds_is_pruned() -> None:
    p = plan([row("a", State.SYNCED, "new")], {"old": NOW - DAY, "new": NOW}, listed("old", "new"))
    assert p.actions == (Prune("old", Why.OLD_VERSION, True),)


def test_queued_copy_with_the_same_content_keeps_the_candidate() -> None:
    rows = [row("a", State.DELETED, "r1", md5="same"), row("b", State.QUEUED, md5="same")]
    p = plan(rows, {"r1": NOW - DAY}, listed("r1"))
    assert p.actions == ()
    assert [kept.remote_id for kept in p.kept] == ["r1"]


def test_retention_prunes_owned_files_and_expires_their_rows() -> None:
    rows = [
        row("a", State.SYNCED, "r1", purpose="batch"),
        row("b", State.SYNCED, "r2", purpose="batch"),
        row("c", State.SYNCED, "r3", purpose="batch"),
    ]
    listing = {
        **listed("r1", purpose="batch", created_at=NOW - 2 * DAY),
        **listed("r2", purpose="batch", created_at=NOW - 0.5 * DAY),
        **listed("r3", purpose="batch", created_at=NOW - 2 * DAY),
    }
    p = plan(rows, {"r1": None, "r2": None}, listing, retention_days={"batch": 1})
    # r2 is too young; r3 is not ours.
    assert p.actions == (Prune("r1", Why.EXPIRED, True, expire=(k("a"),)),)


def test_retention_of_other_purposes_does_not_apply() -> None:
    rows = [row("a", State.SYNCED, "r1")]
    p = plan(rows, {"r1": None}, listed("r1", created_at=0.0), retention_days={"batch": 1})
    assert p.actions == ()


def test_vanished_remote_requeues_present_rows_owned_or_not() -> None:
    rows = [
        row("a", State.SYNCED, "r1"),
        row("b", State.SYNCED, "adopted"),
        row("gone", State.SYNCED, "r9", missing_since=NOW - 1),
    ]
    p = plan(rows, {"r1": NOW - DAY, "r9": NOW - DAY}, {})
    assert p.actions == (Requeue("adopted", (rows[1],), forget=False), Requeue("r1", (rows[0],), forget=True))


def test_row_synced_after_the_listing_began_is_not_judged() -> None:
    p = plan([row("a", State.SYNCED, "fresh", updated_at=NOW + 1)], {"fresh": NOW + 1}, {})
    assert p.actions == ()


def test_a_crash_after_the_delete_is_finished_without_deleting_again() -> None:
    p = plan([row("a", State.DELETED, "r1")], {"r1": NOW - DAY}, {})
    assert p.actions == (Prune("r1", Why.DELETED, False, remove=(k("a"),)),)
    assert p.deletes == 0


def test_a_crash_after_a_retention_delete_expires_rows_instead_of_reuploading() -> None:
    rows = [row("a", State.SYNCED, "r1", purpose="batch")]
    p = plan(rows, {"r1": NOW - 2 * DAY}, {}, retention_days={"batch": 1})
    assert p.actions == (Prune("r1", Why.EXPIRED, False, expire=(k("a"),)),)


def test_unavailable_root_holds_everything_about_its_rows() -> None:
    rows = [
        row("a", State.DELETED, "r1", root_id=2),
        row("b", State.SYNCED, "r2", root_id=2),
        row("c", State.DELETED, "r3", root_id=1),
    ]
    owned: dict[str, float | None] = {"r1": None, "r2": None, "r3": None}
    p = plan(rows, owned, listed("r1", "r3"), unavailable={2: "root is missing"})
    assert p.actions == (Prune("r3", Why.DELETED, True, remove=(k("c"),)),)
    assert {h.guard for h in p.held} == {"root-unavailable"}
    assert {h.action.remote_id for h in p.held} == {"r1", "r2"}
    assert len(p.guards) == 1
    assert "root is missing" in p.guards[0]


def test_max_delete_holds_every_delete_but_not_bookkeeping() -> None:
    rows = [row(f"f{i}", State.DELETED, f"r{i}") for i in range(3)] + [row("z", State.DELETED, "gone")]
    owned: dict[str, float | None] = {f"r{i}": None for i in range(3)}
    owned["gone"] = None
    p = plan(rows, owned, listed("r0", "r1", "r2"), max_delete=2)
    assert p.actions == (Prune("gone", Why.DELETED, False, remove=(k("z"),)),)
    assert [h.guard for h in p.held] == ["max-delete"] * 3
    assert plan(rows, owned, listed("r0", "r1", "r2"), max_delete=2, confirm=True).deletes == 3
    assert plan(rows, owned, listed("r0", "r1", "r2"), max_delete=3).deletes == 3


def test_fraction_guard_applies_above_its_floor_only() -> None:
    n = FRACTION_MIN_DELETES + 1
    rows = [row(f"f{i}", State.DELETED, f"r{i}") for i in range(n)]
    owned: dict[str, float | None] = {f"r{i}": None for i in range(2 * n)}
    rows += [row(f"keep{i}", State.SYNCED, f"r{i}") for i in range(n + 1, 2 * n)]
    listing = listed(*owned)
    p = plan(rows, owned, listing, max_delete_fraction=0.5)  # n of 2n deleted, +1 orphan r{n}
    assert {h.guard for h in p.held} == {"max-delete-fraction"}
    assert p.deletes == 0
    few = [row(f"f{i}", State.DELETED, f"r{i}") for i in range(FRACTION_MIN_DELETES)]
    only: dict[str, float | None] = {f"r{i}": None for i in range(FRACTION_MIN_DELETES)}
    assert plan(few, only, listed(*only), max_delete_fraction=0.1).deletes == FRACTION_MIN_DELETES


def test_dry_run_view_can_assume_rows_deleted() -> None:
    rows = [row("a", State.SYNCED, "r1")]
    p = plan_reconcile(
        rows,
        ledger_for(rows, {"r1": None}),
        listed("r1"),
        settings=ReconcileConfig(),
        unavailable={},
        now=NOW,
        confirm=False,
        assume_deleted={k("a")},
    )
    assert p.actions == (Prune("r1", Why.DELETED, True, remove=(k("a"),)),)


# properties over random manifests

IDS = [f"r{i}" for i in range(6)]
STATES = [State.SYNCED, State.DELETED, State.QUEUED, State.EXPIRED, State.FAILED]


World = tuple[list[Entry], dict[str, float | None], dict[str, RemoteFile], dict[int, str]]


@st.composite
def worlds(draw: st.DrawFn) -> World:
    n = draw(st.integers(0, 8))
    rows = []
    for i in range(n):
        state = draw(st.sampled_from(STATES))
        has_remote = state in (State.SYNCED, State.DELETED, State.EXPIRED)
        rid = draw(st.sampled_from(IDS)) if has_remote else None
        rows.append(
            row(
                f"p{i}",
                state,
                rid,
                root_id=draw(st.sampled_from([1, 2])),
                md5=draw(st.sampled_from("abc")),
                purpose=draw(st.sampled_from(["assistants", "batch"])),
                missing_since=draw(st.sampled_from([None, NOW - 5])),
            )
        )
    owned = {
        rid: draw(st.sampled_from([None, NOW - 3 * DAY, NOW])) for rid in draw(st.sets(st.sampled_from(IDS)))
    }
    listing = {
        rid: RemoteFile(
            rid,
            draw(st.sampled_from(["assistants", "batch"])),
            draw(st.sampled_from([NOW - 3 * DAY, NOW])),
            draw(st.sampled_from([None, "a", "b"])),
        )
        for rid in draw(st.sets(st.sampled_from(IDS)))
    }
    unavailable = {r: "gone" for r in draw(st.sets(st.sampled_from([1, 2]), max_size=1))}
    return rows, owned, listing, unavailable


@settings(max_examples=300, deadline=None)
@given(worlds(), st.booleans(), st.booleans(), st.integers(0, 4), st.booleans())
def test_plan_invariants(
    world: World, prune_deleted: bool, retention: bool, max_delete: int, confirm: bool
) -> None:
    rows, owned, listing, unavailable = world
    p = plan(
        rows,
        owned,
        listing,
        unavailable=unavailable,
        confirm=confirm,
        prune_deleted=prune_deleted,
        max_delete=max_delete,
        retention_days={"batch": 1} if retention else {},
    )
    synced_refs = {e.remote_id for e in rows if e.state is State.SYNCED}
    by_key = {e.key: e for e in rows}
    for action in p.actions:
        # Nothing of an unavailable root is touched.
        assert all(key.root_id not in unavailable for key in action.keys)
        if isinstance(action, Prune):
            # Only files syncd created; a listed delete only of a listed file.
            assert action.remote_id in owned
            assert not action.listed or action.remote_id in listing
            if action.why is Why.EXPIRED:
                assert retention
            else:
                # Never a file a live path still holds; upload-only never deletes because of local changes.
                assert action.remote_id not in synced_refs
                assert prune_deleted or not action.listed
            assert all(by_key[key].state is State.DELETED for key in action.remove)
        elif isinstance(action, Requeue):
            assert action.remote_id not in listing
            assert all(e.state is State.SYNCED and e.missing_since is None for e in action.rows)
        else:
            assert all(by_key[key].state is State.DELETED for key in action.remove)
    if not confirm:
        assert p.deletes <= max_delete
    # A pruned id is the subject of no other action, and rows are never handled twice.
    everything = p.actions + tuple(h.action for h in p.held)
    pruned = [a.remote_id for a in everything if isinstance(a, Prune)]
    assert len(pruned) == len(set(pruned))
    assert not {a.remote_id for a in everything if not isinstance(a, Prune)} & set(pruned)
    keys = [key for a in p.actions for key in a.keys]
    assert len(keys) == len(set(keys))
