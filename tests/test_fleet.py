"""A fleet (issue 11): two syncd with their own state dirs on one account, with overlapping content, and a
third client (the official vlmrun SDK) beside them.

Each member runs `syncd reconcile --once` (the daemon's own wiring: a sync pass, then a reconcile) at the
moments the test chooses, so the order of events is exact. What is asserted is what README "Fleets"
promises: a member prunes only what it uploaded; content one member pruned while another had adopted it
comes back at the other's next reconcile; the SDK's files are never touched.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ServerFactory, Syncd
from soak import write_config
from vlmrun.client import VLMRun

from syncd.manifest import ManifestReader

MakeSyncd = Callable[..., Syncd]


def member(make: MakeSyncd, server: object, name: str) -> Syncd:
    w = make(server, name=name)
    # A root emptied of everything it held is held back as a likely unmounted share: keep one file.
    (w.root / f"{name}-stays.txt").write_bytes(f"member {name} keeps this".encode())
    write_config(
        w,
        watch={"delete_grace_seconds": 0},
        reconcile={"max_delete_fraction": 1.0},
        rules=(),
    )
    return w


def reconcile(w: Syncd) -> None:
    done = w.cli("reconcile", "--once")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr


def owned(w: Syncd) -> set[str]:
    with ManifestReader.open_readonly(w.state_dir) as reader:
        return reader.owned_remote_ids()


def by_name(w: Syncd) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in w.remote():
        out.setdefault(item["filename"], []).append(item["id"])
    return out


@pytest.mark.timeout(180)
def test_members_prune_only_their_uploads_restore_what_another_pruned_and_spare_the_sdk(
    tmp_path: Path, server_factory: ServerFactory, syncd_factory: MakeSyncd
) -> None:
    server = server_factory()
    sdk = VLMRun(api_key=server.api_key, base_url=server.base_url, max_retries=1)
    (tmp_path / "theirs.pdf").write_bytes(b"only the SDK has this")
    (tmp_path / "x.pdf").write_bytes(b"the SDK uploaded this before syncd saw it")
    theirs = {
        sdk.files.upload(tmp_path / "theirs.pdf", purpose="assistants").id,
        sdk.files.upload(tmp_path / "x.pdf", purpose="assistants").id,
    }
    a, b = member(syncd_factory, server, "a"), member(syncd_factory, server, "b")
    (a.root / "a-only.txt").write_bytes(b"only member a has this")
    (a.root / "shared.txt").write_bytes(b"both members have this")
    (a.root / "x.pdf").write_bytes(b"the SDK uploaded this before syncd saw it")
    (b.root / "b-only.txt").write_bytes(b"only member b has this")
    (b.root / "shared.txt").write_bytes(b"both members have this")

    reconcile(a)  # uploads a-only and shared; adopts the SDK's x.pdf
    reconcile(b)  # uploads b-only; adopts a's shared.txt
    names = by_name(a)
    [shared_by_a] = names["shared.txt"]
    assert shared_by_a in owned(a)
    assert shared_by_a not in owned(b), "adopted, never owned"
    assert b.rows()["shared.txt"].remote_id == shared_by_a
    assert a.rows()["x.pdf"].remote_id in theirs
    assert not theirs & (owned(a) | owned(b))

    for name in ("a-only.txt", "shared.txt", "x.pdf"):
        (a.root / name).unlink()
    reconcile(a)  # prunes its own two uploads, releases the SDK's x.pdf
    names = by_name(a)
    assert "a-only.txt" not in names
    assert "shared.txt" not in names, "a pruned its upload although b had adopted it"
    assert theirs <= {i for ids in names.values() for i in ids}

    reconcile(b)  # its shared.txt vanished remotely: uploaded again, now b's own
    [restored] = by_name(b)["shared.txt"]
    assert restored != shared_by_a
    assert b.rows()["shared.txt"].remote_id == restored
    assert restored in owned(b)
    reconcile(a)
    assert by_name(a)["shared.txt"] == [restored], "a never touches b's uploads"

    for name in ("b-only.txt", "shared.txt"):
        (b.root / name).unlink()
    reconcile(b)
    left = {i["id"]: i["filename"] for i in b.remote()}
    assert sorted(left.values()) == ["a-stays.txt", "b-stays.txt", "theirs.pdf", "x.pdf"]
    assert theirs <= set(left), "the SDK's files are untouched"
    assert owned(a) == {a.rows()["a-stays.txt"].remote_id}
    assert owned(b) == {b.rows()["b-stays.txt"].remote_id}


@pytest.mark.timeout(120)
def test_members_uploading_the_same_new_file_at_once_each_prune_only_their_copy(
    tmp_path: Path, server_factory: ServerFactory, syncd_factory: MakeSyncd
) -> None:
    """No lookup is atomic with the upload after it: two members that see the same new file at once may
    both upload it. Each copy then belongs to its uploader alone, and each member's prune is its own."""
    server = server_factory(latency_ms=200)  # both lookups miss before either upload lands
    a, b = member(syncd_factory, server, "a"), member(syncd_factory, server, "b")
    for w in (a, b):
        (w.root / "report.pdf").write_bytes(b"the same report, dropped on two machines")
    runs = [
        subprocess.Popen(
            w.argv("sync", "--once"), env=w.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        for w in (a, b)
    ]
    assert [r.wait(60) for r in runs] == [0, 0]
    copies = set(by_name(a)["report.pdf"])
    assert 1 <= len(copies) <= 2
    assert not owned(a) & owned(b), "a remote file belongs to one member at most"
    assert copies <= owned(a) | owned(b)

    owned_by_a = owned(a)
    (a.root / "report.pdf").unlink()
    reconcile(a)
    assert set(by_name(a).get("report.pdf", [])) == copies - owned_by_a, "a pruned its own copy only"
    reconcile(b)  # b's copy stayed, or b uploads it again if a pruned the only one
    [kept] = by_name(b)["report.pdf"]
    assert b.rows()["report.pdf"].remote_id == kept
    assert kept not in owned_by_a
