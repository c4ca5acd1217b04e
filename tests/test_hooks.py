"""Processing hooks (issue 13, item 4): `[[watch.hooks]]` exec/post, run at least once per synced content.

Pure parts (templates, ids, environment) run with hypothesis; the rest runs `syncd run` and `sync --once`
as processes against the reference server, with a small Python script (run by sys.executable) as the hook.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerFactory, Syncd, md5_of, wait_for
from hypothesis import given
from hypothesis import strategies as st

from syncd.config import HOOK_FIELDS, ConfigError, HookConfig, load_config, parse_config, parse_template
from syncd.hooks import Hook, environment, expand, hook_id, run_command
from syncd.manifest import State

MakeSyncd = Callable[..., Syncd]

HOOK_SCRIPT = """\
import json, os, sys
label, log, *args = sys.argv[1:]
# The path named in LOG.fail-once fails its first run (exit 3), then succeeds.
if args and os.path.exists(log + ".fail-once") and open(log + ".fail-once").read() == args[0]:
    if not os.path.exists(log + ".failed"):
        open(log + ".failed", "w").close()
        print("boom: the first attempt fails", file=sys.stderr)
        sys.exit(3)
with open(log, "a") as fh:
    fh.write(json.dumps({"label": label, "args": args, "env": dict(os.environ)}) + "\\n")
"""


# -- pure ---------------------------------------------------------------------------------------------

values_st = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=20)


@given(st.dictionaries(st.sampled_from(HOOK_FIELDS), values_st, min_size=len(HOOK_FIELDS)), st.data())
def test_expand_fills_each_argument_in_place_and_never_splits(
    fields: dict[str, str], data: st.DataObject
) -> None:
    names = data.draw(st.lists(st.sampled_from(HOOK_FIELDS), max_size=4))
    literal = data.draw(st.text(alphabet="ab -;$'\"", max_size=5))
    argv = ["prog", *(f"{literal}{{{name}}}" for name in names), "{{x}}"]
    out = expand(argv, fields)
    assert len(out) == len(argv)  # a value with spaces, quotes or `;` stays one argument
    assert out[0] == "prog"
    assert out[1 : 1 + len(names)] == [literal + fields[n] for n in names]
    assert out[-1] == "{x}"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("{nope}", "unknown placeholder {nope}"),
        ("{path.__class__}", "unknown placeholder"),
        ("{bytes:>9}", "unknown placeholder"),
        ("a{b", "unbalanced '{'"),
        ("}", "unbalanced '}'"),
    ],
)
def test_a_bad_template_is_refused(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=r"^(unknown|unbalanced)") as info:
        parse_template(text)
    assert str(info.value).startswith(error)


def write(tmp_path: Path, hooks: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[[watch]]\npath = "inbox"\n{hooks}\n', encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("hook", "expected"),
    [
        ('on = "synced"\nexec = "notify {path}"', "watch[0].hooks[0].exec: must be an argv list"),
        ('on = "synced"\nexec = []', "watch[0].hooks[0].exec: the program (first element) is missing"),
        (
            'on = "synced"\nexec = ["x", "{remoteid}"]',
            "watch[0].hooks[0].exec: unknown placeholder {remoteid}",
        ),
        ('on = "synced"', "watch[0].hooks[0]: set exactly one of exec"),
        ('on = "synced"\nexec = ["x"]\npost = "http://127.0.0.1:1/"', "set exactly one of exec"),
        ('on = "synced"\npost = "http://127.0.0.1:1/"\npass_api_key = true', "pass_api_key applies to exec"),
        ('on = "synced"\npost = "ftp://x"', "watch[0].hooks[0].post: must be an http(s) URL"),
        ('on = "deleted"\nexec = ["x"]', "watch[0].hooks[0].on: Input should be 'synced'"),
        ('exec = ["x"]', "watch[0].hooks[0].on: Field required"),
        (
            'on = "synced"\nexec = ["x"]\nper = "file"',
            "watch[0].hooks[0].per: Input should be 'content' or 'path'",
        ),
        ('on = "synced"\nexec = ["x"]\npattern = "!*.pdf"', "watch[0].hooks[0].pattern: pattern '!*.pdf'"),
        ('on = "synced"\nexec = ["x"]\ntimeout_seconds = 0', "watch[0].hooks[0].timeout_seconds"),
        ('on = "synced"\nexec = ["x"]\nretries = 3', "watch[0].hooks[0].retries: unknown key"),
    ],
)
def test_bad_hooks_are_one_line_errors_naming_the_key(tmp_path: Path, hook: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"[[watch.hooks]]\n{hook}"))
    assert "\n" not in str(info.value)
    assert expected in str(info.value)


def test_the_example_config_documents_every_hook_and_after_sync_key() -> None:
    text = (Path(__file__).resolve().parent.parent / "config.example.toml").read_text(encoding="utf-8")
    for key in (*HookConfig.model_fields, "after_sync", "move_to"):
        assert re.search(rf"^(# )?{key} = ", text, re.MULTILINE), f"{key} is not in config.example.toml"
    # Uncommented, the example hook is a valid config.
    block = text[text.index("# [[watch.hooks]]") :].split("\n[")[0].splitlines()  # up to the next table
    keys = [line[2:] for line in block if re.match(r"^# (\[\[watch\.hooks\]\]|[a-z_]+ = )", line)]
    example = "[[watch]]\npath = 'x'\n" + "\n".join(k for k in keys if not k.startswith("post"))
    [hook] = parse_config(tomllib.loads(example), source="example", base=Path("/etc/syncd")).watch[0].hooks
    assert hook == HookConfig(
        on="synced", exec=("/etc/syncd/hooks/predict.py", "{remote_id}", "{path}"), pattern="scans/**"
    )


def test_a_relative_program_resolves_next_to_the_config(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[[watch.hooks]]\non = "synced"\nexec = ["./hooks/run.py", "./x"]'))
    assert cfg.watch[0].hooks[0].exec == (str(tmp_path / "hooks/run.py"), "./x")


def test_a_hook_id_is_its_definition_but_not_its_timeout() -> None:
    base = HookConfig(on="synced", exec=("notify", "{remote_id}"))
    root = Path("/srv/inbox")
    assert hook_id(root, base) == hook_id(root, base.model_copy(update={"timeout_seconds": 5.0}))
    assert hook_id(root, base) != hook_id(root, base.model_copy(update={"per": "path"}))
    assert hook_id(root, base) != hook_id(root, base.model_copy(update={"exec": ("notify", "{md5}")}))
    assert hook_id(root, base) != hook_id(Path("/srv/other"), base)


def make_hook(config: HookConfig) -> Hook:
    return Hook("h1", 0, Path("/srv"), config, lambda relpath: True)


def test_the_key_reaches_a_command_only_with_pass_api_key() -> None:
    inherited = {"PATH": "/usr/bin", "VLMRUN_API_KEY": "sk-secret", "CREDENTIALS_DIRECTORY": "/run/c"}
    fields = dict.fromkeys(HOOK_FIELDS, "v")
    plain = make_hook(HookConfig(on="synced", exec=("x",)))
    env = environment(inherited, fields, hook=plain, base_url="http://b/v1", api_key="sk-secret")
    assert "sk-secret" not in json.dumps(env)
    assert "CREDENTIALS_DIRECTORY" not in env
    assert env["PATH"] == "/usr/bin"
    assert env["SYNCD_REMOTE_ID"] == "v"
    assert env["SYNCD_BASE_URL"] == "http://b/v1"
    passed = make_hook(HookConfig(on="synced", exec=("x",), pass_api_key=True))
    env = environment(inherited, fields, hook=passed, base_url="http://b/v1", api_key="sk-secret")
    assert (env["SYNCD_API_KEY"], env["VLMRUN_API_KEY"], env["VLMRUN_BASE_URL"]) == (
        "sk-secret",
        "sk-secret",
        "http://b/v1",
    )


def test_a_command_that_overruns_its_timeout_is_killed_with_what_it_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time;"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid));"
        "time.sleep(60)"
    )
    started = time.monotonic()
    result = asyncio.run(run_command([sys.executable, "-c", script], env=dict(os.environ), seconds=1.0))
    assert not result.ok
    assert result.detail == "timed out after 1 s (killed)"
    assert time.monotonic() - started < 10
    grandchild = int(pid_file.read_text())
    wait_for(lambda: not Path(f"/proc/{grandchild}").exists() or _zombie(grandchild), what="grandchild gone")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def test_a_failing_command_reports_its_exit_code_and_last_stderr_line() -> None:
    script = "import sys; print('first', file=sys.stderr); print('the reason', file=sys.stderr); sys.exit(4)"
    result = asyncio.run(run_command([sys.executable, "-c", script], env=dict(os.environ), seconds=30))
    assert (result.ok, result.detail) == (False, "exit 4: the reason")
    missing = asyncio.run(run_command(["/nonexistent/prog"], env={}, seconds=30))
    assert not missing.ok
    assert missing.detail.startswith("cannot start /nonexistent/prog: ")


# -- end to end ---------------------------------------------------------------------------------------------


class Hooked:
    """A workspace whose watch runs hooks: the hook script, its log, and the config's hook tables."""

    def __init__(self, w: Syncd) -> None:
        self.w = w
        self.script = w.workdir / "hook.py"
        self.script.write_text(HOOK_SCRIPT, encoding="utf-8")
        self.log = w.workdir / "hooks.log"

    def exec_hook(self, label: str, *args: str, **keys: Any) -> str:
        argv = [sys.executable, str(self.script), label, str(self.log), *args]
        lines = ["[[watch.hooks]]", 'on = "synced"', f"exec = {json.dumps(argv)}"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
        return "\n".join(lines) + "\n"

    def configure(self, *hooks: str, **settings: Any) -> None:
        self.w.configure(rules=(), **settings)
        with self.w.config_path.open("a", encoding="utf-8") as fh:
            fh.write("".join(hooks))

    def runs(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.endswith("}")]

    def ran(self, label: str) -> list[list[str]]:
        return [r["args"] for r in self.runs() if r["label"] == label]


@pytest.fixture
def hooked(server_factory: ServerFactory, syncd_factory: MakeSyncd) -> Hooked:
    return Hooked(syncd_factory(server_factory()))


@pytest.mark.timeout(90)
def test_kill_9_in_the_middle_every_synced_file_gets_its_hook_and_a_failure_is_retried(
    server_factory: ServerFactory, syncd_factory: MakeSyncd
) -> None:
    server = server_factory(latency_ms=100)  # 50 files take a few seconds: there is a middle to kill in
    w = syncd_factory(server)
    h = Hooked(w)
    h.configure(h.exec_hook("drop", "{relpath}", "{remote_id}", "{md5}"), settle=0.2, concurrency=2)
    Path(f"{h.log}.fail-once").write_text("f07.txt")
    first = w.start()
    first.wait_ready()
    files = {f"f{i:02}.txt": f"drop folder file {i}\n".encode() for i in range(50)}
    for name, data in files.items():
        (w.root / name).write_bytes(data)
    wait_for(
        lambda: sum(r.state is State.SYNCED for r in w.rows().values()) >= 15,
        what="a third of the files synced",
        diagnose=first.tail,
    )
    first.kill9()
    remote = {f["id"]: f for f in w.remote()}
    for args in h.ran("drop"):  # every hook so far ran for a file the server holds, with its content
        relpath, remote_id, md5 = args
        assert remote[remote_id]["md5"] == md5 == md5_of(files[relpath])
    assert len(h.ran("drop")) < 50, "the kill came too late to be in the middle"

    second = w.start()
    rows = w.wait_synced(*files, daemon=second, timeout=40)

    def all_ran() -> bool:
        done = {(a[0], a[1]) for a in h.ran("drop")}
        return all((p, r.remote_id) in done for p, r in rows.items())

    wait_for(all_ran, timeout=30, what="every synced file's hook", diagnose=second.tail)
    for relpath, remote_id, md5 in h.ran("drop"):
        assert (rows[relpath].remote_id, rows[relpath].md5) == (remote_id, md5)  # none for an unsynced file
    failed = "hook failed; it will be retried"
    assert first.logged(failed, path="f07.txt") or second.logged(failed, path="f07.txt")
    assert ["f07.txt", rows["f07.txt"].remote_id, rows["f07.txt"].md5] in h.ran("drop")

    def settled() -> dict[str, Any] | None:
        [hook] = w.status()["hooks"]
        return hook if hook["done"] == 50 and hook["pending"] == 0 else None

    hook = wait_for(settled, timeout=15, what="status to show every run done")
    assert hook["failures"] >= 1
    assert hook["last_error"] == "exit 3: boom: the first attempt fails"
    assert hook["last_error_path"] == "f07.txt"
    assert hook["name"] == "exec " + Path(sys.executable).name
    assert second.stop() == 0
    assert len(second.logged("hook ran")) <= 50


@pytest.mark.timeout(60)
def test_per_content_per_path_a_later_hook_and_the_key(hooked: Hooked) -> None:
    h, w = hooked, hooked.w
    key = w.server.api_key
    hooks = [
        h.exec_hook("content", "{relpath}", "{remote_id}"),
        h.exec_hook("path", "{relpath}", "{remote_id}", per="path"),
        h.exec_hook("keyless", "{relpath}", pattern="*.pdf"),
        h.exec_hook("keyed", "{relpath}", pattern="*.pdf", pass_api_key=True),
    ]
    h.configure(*hooks)
    (w.root / "a.pdf").write_bytes(b"%PDF the document")
    assert w.sync_once().returncode == 0
    [a] = h.ran("content")
    assert h.ran("path") == [a]
    assert a == ["a.pdf", w.rows()["a.pdf"].remote_id]

    (w.root / "b.pdf").write_bytes((w.root / "a.pdf").read_bytes())  # a copy: same content, new path
    assert w.sync_once().returncode == 0
    assert h.ran("content") == [a], "per = content: a copy does not fire it again"
    assert h.ran("path") == [a, ["b.pdf", a[1]]], "per = path: it does"

    h.configure(*hooks, h.exec_hook("later", "{relpath}"))  # added now: only for files synced from now
    (w.root / "c.txt").write_bytes(b"synced after the hook was added")
    assert w.sync_once().returncode == 0
    assert h.ran("later") == [["c.txt"]]
    assert [args[0] for args in h.ran("content")] == ["a.pdf", "c.txt"]

    keyless = [r["env"] for r in h.runs() if r["label"] == "keyless"]
    keyed = [r["env"] for r in h.runs() if r["label"] == "keyed"]
    assert len(keyless) == len(keyed) == 1  # the pattern: only a.pdf (b.pdf is a copy: per content)
    assert not [k for k, v in keyless[0].items() if key in v or k in ("VLMRUN_API_KEY", "SYNCD_API_KEY")]
    assert (keyed[0]["SYNCD_API_KEY"], keyed[0]["VLMRUN_API_KEY"]) == (key, key)
    assert keyless[0]["SYNCD_REMOTE_ID"] == a[1]
    assert keyless[0]["SYNCD_BYTES"] == str(len(b"%PDF the document"))
    assert keyless[0]["SYNCD_PATH"] == str(w.root / "a.pdf")


class Webhook:
    """A JSON webhook on 127.0.0.1 that answers 500 to its first ``fail`` requests, then 204."""

    def __init__(self, fail: int) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.bodies.append(json.loads(body))
                hook.headers.append(dict(self.headers))
                failing = len(hook.bodies) <= fail
                self.send_response(500 if failing else 204)
                self.send_header("Content-Length", "7" if failing else "0")
                self.end_headers()
                if failing:
                    self.wfile.write(b"down!\n\n")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=t0ken"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.timeout(60)
def test_a_webhook_gets_the_fields_a_failure_shows_in_status_and_the_next_pass_retries(
    hooked: Hooked,
) -> None:
    h, w = hooked, hooked.w
    webhook = Webhook(fail=1)
    try:
        h.configure(f'[[watch.hooks]]\non = "synced"\npost = "{webhook.url}"\n')
        configured = time.time()
        (w.root / "report.pdf").write_bytes(b"%PDF for the webhook")
        first = w.sync_once()
        assert first.returncode == 1, "a failed hook makes the pass exit 1"
        assert w.rows()["report.pdf"].state is State.SYNCED, "a failed hook never un-syncs a file"
        [hook] = w.status()["hooks"]
        assert (hook["pending"], hook["failing"], hook["failures"]) == (1, 1, 1)
        assert hook["last_error"] == "HTTP 500: down!"
        assert "t0ken" not in hook["name"]
        assert w.sync_once().returncode == 0
    finally:
        webhook.close()
    row = w.rows()["report.pdf"]
    assert len(webhook.bodies) == 2
    body = webhook.bodies[-1]
    assert {
        k: body[k] for k in ("event", "relpath", "remote_id", "md5", "bytes", "purpose", "public_url")
    } == {
        "event": "synced",
        "relpath": "report.pdf",
        "remote_id": row.remote_id,
        "md5": md5_of(b"%PDF for the webhook"),
        "bytes": len(b"%PDF for the webhook"),
        "purpose": "assistants",
        "public_url": None,
    }
    assert body["path"] == str(w.root / "report.pdf")
    sent = json.dumps(webhook.headers) + json.dumps(webhook.bodies)
    assert w.server.api_key not in sent
    assert "authorization" not in {k.lower() for k in webhook.headers[-1]}
    [hook] = w.status()["hooks"]
    assert (hook["done"], hook["pending"], hook["failures"]) == (1, 0, 1)
    assert configured <= hook["since"] <= time.time()  # when the hook was first seen
