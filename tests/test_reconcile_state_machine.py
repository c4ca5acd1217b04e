"""Random sequences of local changes, root trouble, other clients and time, each followed by checks that
syncd never deleted a remote file it had to keep, and that a final pass leaves every live file synced.

One server for the whole test, seeded with other clients' files; a fresh state dir and root per example
(each example removes what it added, so listings stay small). syncd only runs in the ``reconcile`` step
(and the final pass), so that is where the checks run. ``HYPOTHESIS_PROFILE=soak`` runs 1,000 longer
examples instead of 200 short ones.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from conftest import FakeClock
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import (
    RuleBasedStateMachine,
    precondition,
    rule,
    run_state_machine_as_test,
)
from test_reconcile import Harness
from vlmrun.client import VLMRun

from syncd.api import FileResponse
from syncd.manifest import Entry, State
from syncd.server import RunningServer, ServerSettings, running_server

DAY = 86400.0
NAMES = ("a.pdf", "b.pdf", "c.jsonl", "d/e.pdf", "d/f.jsonl")
PURPOSE_RULES = [{"pattern": "*.jsonl", "purpose": "batch"}]
RETENTION = {"batch": 1}

SOAK = os.environ.get("HYPOTHESIS_PROFILE") == "soak"
try:
    settings.get_profile("soak")
except InvalidArgument:
    settings.register_profile("soak", max_examples=1000, stateful_step_count=30, deadline=None)
MACHINE_SETTINGS = settings(
    max_examples=1000 if SOAK else 200,
    stateful_step_count=30 if SOAK else 15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def purpose_of(relpath: str) -> str:
    return "batch" if relpath.endswith(".jsonl") else "assistants"


class ReconcileMachine(RuleBasedStateMachine):
    def __init__(self, server: RunningServer, clock: FakeClock) -> None:
        super().__init__()
        self.server = server
        self.clock = clock
        self.base = Path(tempfile.mkdtemp(prefix="syncd-sm-"))
        self.h = Harness(
            self.base / "h",
            server,
            clock,
            watch={"rules": PURPOSE_RULES},
            reconcile={"retention_days": RETENTION},
        )
        self.away = self.h.root.with_name("away")
        self.salt = secrets.token_hex(4).encode()
        self.files: dict[str, bytes] = {}
        self.root_away = False
        self.retention_passed = False
        self.sdk = VLMRun(api_key=server.api_key, base_url=server.base_url, max_retries=1)
        self.foreign = set(self.h.remote())
        """Files that existed before this example (the seeds): other clients' files to this manifest."""
        self.theirs: set[str] = set()
        """Files uploaded by another client during this example."""

    def content(self, i: int) -> bytes:
        return self.salt + b"-content-%d" % i

    def where(self) -> Path:
        return self.away if self.root_away else self.h.root

    def teardown(self) -> None:
        try:
            if self.root_away:
                os.rename(self.away, self.h.root)
                self.root_away = False
            self.h.run()
            self.h.run()
            remote = self.h.remote()
            self.others_files_stay(remote)
            self.check_live_files_synced(remote)
            # Keep the shared server small (listing cost grows with it): only the seeded files stay.
            for rid in set(remote) - self.foreign:
                self.h.loop.run_until_complete(self.h.api.delete(rid))
        finally:
            self.h.close()
            shutil.rmtree(self.base, ignore_errors=True)

    # local changes (also while the root is renamed away: the user edits the unmounted disk)

    @rule(name=st.sampled_from(NAMES), i=st.integers(0, 3))
    def create_or_edit(self, name: str, i: int) -> None:
        path = self.where() / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.content(i))
        self.files[name] = self.content(i)

    @precondition(lambda self: bool(self.files))
    @rule(data=st.data(), dst=st.sampled_from(NAMES))
    def rename(self, data: st.DataObject, dst: str) -> None:
        src = data.draw(st.sampled_from(sorted(self.files)))
        if dst in self.files:
            return
        (self.where() / dst).parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.where() / src, self.where() / dst)
        self.files[dst] = self.files.pop(src)

    @precondition(lambda self: bool(self.files))
    @rule(data=st.data(), dst=st.sampled_from(NAMES))
    def copy(self, data: st.DataObject, dst: str) -> None:
        src = data.draw(st.sampled_from(sorted(self.files)))
        if dst in self.files:
            return
        (self.where() / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.where() / src, self.where() / dst)
        self.files[dst] = self.files[src]

    @precondition(lambda self: bool(self.files))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.files)))
        (self.where() / name).unlink()
        del self.files[name]

    @precondition(lambda self: not self.root_away)
    @rule()
    def root_vanishes(self) -> None:
        os.rename(self.h.root, self.away)
        self.root_away = True

    @precondition(lambda self: self.root_away)
    @rule()
    def root_returns(self) -> None:
        os.rename(self.away, self.h.root)
        self.root_away = False

    # the world

    @rule(i=st.integers(0, 3), purpose=st.sampled_from(["assistants", "batch"]))
    def other_client_uploads(self, i: int, purpose: str) -> None:
        path = self.base / "sdk" / "upload.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(self.content(i))
        self.theirs.add(self.sdk.files.upload(path, purpose=purpose, force=True).id)

    @rule()
    def clock_passes_retention(self) -> None:
        self.clock.advance(RETENTION["batch"] * DAY + 60)
        self.retention_passed = True

    @rule(confirm=st.booleans())
    def reconcile(self, confirm: bool) -> None:
        before = self.h.remote()
        rows_before = self.h.rows()
        owned_before = self.h.ledger()
        deletes = self.server.stats.deletes
        report = self.h.run(confirm=confirm)
        after = self.h.remote()
        self.others_files_stay(after)
        vanished = set(before) - set(after)
        assert self.server.stats.deletes - deletes == len(vanished), "a delete was sent twice or in vain"
        for rid in vanished:
            self.check_may_delete(before[rid], rows_before, owned_before)
        if self.root_away:
            if self.h.registered_roots():  # a root never seen has nothing to protect (the sync pass says so)
                assert report.held
                assert report.exit_code == 1
        else:
            self.check_live_files_synced(after)

    # checks

    def others_files_stay(self, remote: dict[str, FileResponse]) -> None:
        assert self.foreign <= set(remote)
        assert self.theirs <= set(remote)

    def check_may_delete(
        self, gone: FileResponse, rows_before: dict[str, Entry], owned_before: set[str]
    ) -> None:
        assert gone.id not in self.foreign, "deleted another client's file"
        assert gone.id not in self.theirs, "deleted another client's file"
        assert gone.id in owned_before, "deleted a file syncd did not create"
        expired = (
            gone.purpose == "batch" and gone.created_at.timestamp() + RETENTION["batch"] * DAY <= self.h.now()
        )
        if expired:
            return
        for relpath, entry in rows_before.items():
            live = self.files.get(relpath)
            if entry.state is State.SYNCED and entry.remote_id == gone.id and live is not None:
                assert md5(live) != entry.md5, f"pruned {gone.id} still held by live {relpath}"
        after = self.h.rows()
        for relpath, data in self.files.items():
            if (md5(data), purpose_of(relpath)) == (gone.md5, gone.purpose):
                now = after.get(relpath)
                assert now is not None, f"{relpath} has no row"
                assert now.remote_id != gone.id, f"{relpath} lost its remote file"

    def check_live_files_synced(self, remote: dict[str, FileResponse] | None = None) -> None:
        remote = self.h.remote() if remote is None else remote
        rows = self.h.rows()
        for relpath, data in self.files.items():
            entry = rows.get(relpath)
            assert entry is not None, f"{relpath} has no row"
            assert entry.md5 == md5(data), f"{relpath}: row holds other content"
            if entry.state is State.EXPIRED:
                assert self.retention_passed
                assert entry.purpose == "batch"
                continue
            assert entry.state is State.SYNCED, f"{relpath} is {entry.state}"
            assert entry.remote_id in remote, f"{relpath}: its remote file {entry.remote_id} is gone"
            assert remote[entry.remote_id].md5 == entry.md5
            assert remote[entry.remote_id].purpose == purpose_of(relpath)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, FakeClock]]:
    clock = FakeClock(datetime.fromisoformat("2026-02-01T00:00:00+00:00"))
    data = tmp_path_factory.mktemp("sm-server")
    with running_server(
        ServerSettings(data_dir=data, api_key=secrets.token_urlsafe(16), port=0), clock=clock
    ) as server:
        seeds = data / "seeds"
        seeds.mkdir()
        other = VLMRun(api_key=server.api_key, base_url=server.base_url, max_retries=1)
        for i, purpose in enumerate(["assistants", "batch", "vision"]):
            (seeds / f"seed{i}.pdf").write_bytes(b"another client's file %d" % i)
            other.files.upload(seeds / f"seed{i}.pdf", purpose=purpose, force=True)
        yield server, clock


@pytest.mark.timeout(1800 if SOAK else 300)
def test_reconcile_state_machine(shared_server: tuple[RunningServer, FakeClock]) -> None:
    server, clock = shared_server

    class Machine(ReconcileMachine):
        def __init__(self) -> None:
            super().__init__(server, clock)

    run_state_machine_as_test(Machine, settings=MACHINE_SETTINGS)
