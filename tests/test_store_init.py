"""A store is made by `fcsnap init` (or `pack --init`); every other command refuses a --store
that is not one, so a mistyped path never starts a second store. Stores made before the
marker are still read; `s3:/x` and its kin get a hint before anything is touched."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import obstore
import pytest
from helpers import fcsnap_here as fcsnap  # in this process: the store is tested here
from s3_helpers import Bucket
from store_procs import start_stopped
from test_bad_input import tree

import fcsnap as api
from fcsnap.store.backends.remote import RemoteStore
from fcsnap.store.backends.s3 import S3Objects, parse_s3_url
from fcsnap.store.format import marker
from fcsnap.store.format.marker import State
from fcsnap.store.operations import ops
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.testing.memimage import synthetic_memory, write_full

SIZE = 1 << 20
MARKER = "fcsnap-store.json"  # docs/FORMAT.md §2.3


def one_line(result, status: int = 1) -> str:  # noqa: ANN001
    assert (result.returncode, result.stdout) == (status, ""), result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcsnap: error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/store: a store made by `fcsnap init` holding build `web`; root/m0: its memory."""
    root = tmp_path_factory.mktemp("made")
    write_full(root / "m0", synthetic_memory(SIZE, seed=41))
    assert fcsnap("init", root / "store").returncode == 0
    assert fcsnap("pack", root / "m0", "--store", root / "store", "--name", "web",
                  "-q").returncode == 0
    return root


def test_init_creates_a_store_and_is_idempotent(tmp_path: Path) -> None:
    store = tmp_path / "a" / "b"
    first = fcsnap("init", store, "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"schema": 1, "store": str(store), "result": "created"}
    assert json.loads((store / MARKER).read_text()) == {"format": "fcsnap-store", "version": 1}
    before = tree(tmp_path)
    again = fcsnap("init", store)
    assert (again.returncode, again.stdout) == (0, f"{store} is already a store\n")
    assert tree(tmp_path) == before
    listed = fcsnap("ls", "--store", store, "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)["names"] == []
    (tmp_path / "empty").mkdir()
    assert fcsnap("init", tmp_path / "empty", "-q").returncode == 0
    assert (tmp_path / "empty" / MARKER).is_file()


@pytest.mark.parametrize("what", ["files", "file"])
def test_init_refuses_what_is_not_empty(tmp_path: Path, what: str) -> None:
    target = tmp_path / "t"
    if what == "files":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    else:
        target.write_text("mine")
    before = tree(tmp_path)
    line = one_line(fcsnap("init", target))
    assert ("holds other files" if what == "files" else "is not a directory") in line
    assert tree(tmp_path) == before


def test_a_store_from_an_older_fcsnap_is_read_and_init_marks_it(tmp_path: Path) -> None:
    """A store without the marker (what fcsnap wrote before it) is recognised by its layout:
    read and written as it is; `init` writes its marker."""
    store = tmp_path / "old"
    write_full(tmp_path / "m0", synthetic_memory(SIZE, seed=42))
    ops.pack(tmp_path / "m0", store, BuildOptions(name="web"))
    assert not (store / MARKER).exists()
    for argv in (("ls", "--store", store), ("verify", "web", "--store", store),
                 ("diff", tmp_path / "m0", "--base", "web", "--store", store, "--name", "web")):
        done = fcsnap(*argv)
        assert done.returncode == 0, done.stderr
    assert not (store / MARKER).exists()
    marked = fcsnap("init", store, "--json")
    assert json.loads(marked.stdout)["result"] == "adopted"
    assert (store / MARKER).is_file()
    assert fcsnap("verify", "web", "--store", store).returncode == 0


def test_an_older_store_emptied_by_gc_is_still_a_store(tmp_path: Path) -> None:
    """gc of an unmarked store's last build leaves only its own `.gc.lock`: still a store,
    to use and to mark, not a directory of other files."""
    store = tmp_path / "old"
    write_full(tmp_path / "m0", synthetic_memory(SIZE, seed=44))
    ops.pack(tmp_path / "m0", store, BuildOptions())
    assert fcsnap("gc", "--store", store, "--grace", "0s").returncode == 0
    assert [p.name for p in store.iterdir()] == [".gc.lock"]
    listed = fcsnap("ls", "--store", store)
    assert listed.returncode == 0, listed.stderr
    marked = fcsnap("init", store, "--json")
    assert marked.returncode == 0, marked.stderr
    assert json.loads(marked.stdout)["result"] == "adopted"


def _commands(store: str, good: Path) -> dict[str, list[object]]:
    """Every command given `store` as the store it uses (a real store for the other side)."""
    other = good / "store"
    return {
        "pack": ["pack", good / "m0", "--store", store],
        "diff": ["diff", good / "m0", "--base", "web", "--store", store],
        "squash": ["squash", "web", "--store", store],
        "ls": ["ls", "--store", store],
        "inspect": ["inspect", "web", "--store", store],
        "verify": ["verify", "web", "--store", store],
        "unpack": ["unpack", "web", "--store", store, "-o", "out.mem"],
        "tag": ["tag", "web", "x", "--store", store],
        "rm": ["rm", "web", "--store", store],
        "gc": ["gc", "--store", store],
        "restore": ["restore", "web", "--store", store, "--socket", "web.uffd"],
        "serve": ["serve", "--store", store, "--api", "api.sock"],
        "push-to": ["push", "web", "--from", other, "--to", store],
        "push-from": ["push", "web", "--from", store, "--to", other],
        "pull-to": ["pull", "web", "--from", other, "--to", store],
        "import": ["import", good, "--store", store],
        "export": ["export", "web", "--store", store, "-o", "e2b"],
    }


COMMANDS = list(_commands("", Path()))


@pytest.mark.parametrize("state", ["missing", "empty", "other-files"])
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_a_store_that_is_not_one(
    made: Path, tmp_path: Path, command: str, state: str
) -> None:
    """One line naming the directory and `fcsnap init`, exit 1, nothing created anywhere."""
    work = tmp_path / "cwd"
    work.mkdir()
    store = work / "typo"
    if state != "missing":
        store.mkdir()
    if state == "other-files":
        (store / "notes.txt").write_text("mine")
    before, kept = tree(tmp_path), tree(made)
    result = fcsnap(*_commands(str(store), made)[command], cwd=work, timeout=60)
    line = one_line(result)
    assert str(store) in line and f"'fcsnap init {store}'" in line, line
    assert tree(tmp_path) == before and tree(made) == kept


def test_fcsnap_store_env_is_checked_too(made: Path, tmp_path: Path) -> None:
    env = os.environ | {"FCSNAP_STORE": str(tmp_path / "typo")}
    line = one_line(fcsnap("ls", env=env))
    assert "fcsnap init" in line and not (tmp_path / "typo").exists()
    env["FCSNAP_STORE"] = str(made / "store")
    assert fcsnap("ls", env=env).returncode == 0


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_pack_init_makes_the_store_with_its_build(made: Path, tmp_path: Path,
                                                  where: str) -> None:
    store = tmp_path / "new"
    if where == "empty":
        store.mkdir()
    packed = fcsnap("pack", "--init", made / "m0", "--store", store, "--name", "web", "--json")
    assert packed.returncode == 0, packed.stderr
    assert (store / MARKER).is_file() and (store / "vms" / "web").is_file()
    again = fcsnap("pack", "--init", made / "m0", "--store", store, "-q")
    assert again.returncode == 0, again.stderr


def test_a_first_pack_init_killed_leaves_a_store_to_go_on_with(made: Path,
                                                               tmp_path: Path) -> None:
    """Killed while its build is staged (before the marker): what it left is a store, which
    the next command uses and cleans, not a directory to refuse."""
    store = tmp_path / "new"
    killed = start_stopped("pack", "--init", made / "m0", "--store", store, point="staged")
    killed.kill()
    killed.communicate(timeout=60)
    assert [p.name[:9] for p in store.iterdir()] == [".staging-"]
    assert fcsnap("ls", "--store", store).returncode == 0
    again = fcsnap("pack", "--init", made / "m0", "--store", store, "--name", "web", "-q")
    assert again.returncode == 0, again.stderr
    assert (store / MARKER).is_file() and not list(store.glob(".staging-*"))


def test_pack_init_refuses_a_directory_holding_other_files(made: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    line = one_line(fcsnap("pack", "--init", made / "m0", "--store", tmp_path))
    assert "holds other files" in line and tree(tmp_path) == before


def test_push_init_makes_the_destination(made: Path, tmp_path: Path) -> None:
    dest = tmp_path / "copy"
    pushed = fcsnap("push", "web", "--from", made / "store", "--to", dest, "--init", "-q")
    assert pushed.returncode == 0, pushed.stderr
    assert (dest / MARKER).is_file()
    assert fcsnap("verify", "web", "--store", dest).returncode == 0


@pytest.mark.parametrize(("marker", "says"), [
    (b'{"format": "fcsnap-store", "version": 2}\n', "has store format version 2"),
    (b"garbage", "is damaged"),
    (b'{"format": "fcsnap-store"}', "no format version"),
    (b'{"format": "fcsnap-store", "version": 1, "x": ' + b"[" * 2000 + b"]" * 2000 + b"}",
     "is damaged"),  # nested too deep for the JSON parser: damaged, not an internal error
])
def test_a_damaged_or_newer_marker_is_refused(made: Path, tmp_path: Path, marker: bytes,
                                              says: str) -> None:
    store = tmp_path / "s"
    store.mkdir()
    (store / MARKER).write_bytes(marker)
    assert says in one_line(fcsnap("ls", "--store", store))


def test_a_symlinked_marker_is_not_followed(tmp_path: Path) -> None:
    """A marker planted as a link (to a file elsewhere) does not make a store, and init
    neither writes through it nor takes it for one."""
    (tmp_path / "elsewhere").write_text('{"format": "fcsnap-store", "version": 1}')
    store = tmp_path / "s"
    store.mkdir()
    (store / MARKER).symlink_to(tmp_path / "elsewhere")
    assert "symbolic link" in one_line(fcsnap("ls", "--store", store))
    assert "symbolic link" in one_line(fcsnap("init", store))


@pytest.mark.parametrize(("text", "meant"), [
    ("s3:/bucket/snaps", "s3://bucket/snaps"),
    ("s3:bucket/snaps", "s3://bucket/snaps"),
    ("S3://bucket/snaps", "s3://bucket/snaps"),
    ("S3:/bucket", "s3://bucket"),
])
@pytest.mark.parametrize("argv", [
    ("init", "{}"), ("ls", "--store", "{}"), ("pack", "--init", "m0", "--store", "{}"),
    ("push", "web", "--from", "store", "--to", "{}"),
])
def test_an_s3_url_misspelt_gets_a_hint(made: Path, text: str, meant: str,
                                        argv: tuple[str, ...]) -> None:
    """A usage error (exit 2) before anything is read or written: no directory `s3:`."""
    before = tree(made)
    result = fcsnap(*[a.format(text) for a in argv], cwd=made)
    assert result.returncode == 2, result.stderr
    assert f"did you mean {meant}?" in result.stderr and len(result.stderr.splitlines()) == 1
    assert tree(made) == before


def test_store_api_init_and_refusal(tmp_path: Path) -> None:
    with pytest.raises(api.FcsnapError, match="fcsnap init"):
        api.Store(tmp_path / "typo").ls()
    assert not (tmp_path / "typo").exists()
    store = api.Store.init(tmp_path / "new")
    assert (tmp_path / "new" / MARKER).is_file() and store.ls()["names"] == []
    with pytest.raises(api.UsageError, match="did you mean s3://b/x"):
        api.Store("s3:/b/x").ls()


def test_store_api_ls_rm_gc_push_pull_print_what_the_cli_prints(
    made: Path, tmp_path: Path
) -> None:
    """Each returns the object its command prints with --json (without the schema key)."""
    store = tmp_path / "s"
    api.Store.init(store).pack(made / "m0", name="web")
    s = api.Store(store)
    assert fcsnap("tag", "web", "old", "--store", store).returncode == 0

    def cli(*argv: object) -> dict:
        done = fcsnap(*argv, "--json")
        assert done.returncode == 0, done.stderr
        printed = json.loads(done.stdout)
        assert printed.pop("schema") == 1
        return printed

    assert s.ls() == cli("ls", "--store", store)
    assert s.ls(builds=True) == cli("ls", "--builds", "--store", store)
    assert s.ls("web") == cli("ls", "web", "--store", store)
    copy = api.Store.init(tmp_path / "copy")
    pushed = s.push("web", copy)
    assert pushed["builds"][0]["copied"] and pushed | {"to": ""} == cli(
        "push", "web", "--from", store, "--to", tmp_path / "copy2", "--init") | {"to": ""}
    pulled = api.Store.init(tmp_path / "pulled").pull("web", store)
    assert pulled["builds"][0]["copied"] and pulled["name"] == "web"
    assert api.Store(tmp_path / "pulled").verify("web").builds_checked == 1
    assert s.rm("old") == [{"name": "old", "head": pushed["head"]}]
    assert s.gc(dry_run=True) == cli("gc", "--dry-run", "--store", store)
    with pytest.raises(api.FcsnapError, match="nope"):
        s.rm("web", "nope")
    assert s.ls()["names"][0]["name"] == "web"
    with pytest.raises(api.UsageError, match="grace"):
        s.gc(grace="1")


def test_init_and_refusal_in_s3(bucket: Bucket, tmp_path: Path) -> None:
    """Against a real S3 server: an empty prefix is no store, init marks it (once), pack
    --init makes one, and a prefix holding other objects is refused."""
    write_full(tmp_path / "m0", synthetic_memory(SIZE, seed=43))
    store = bucket.url("typo")
    for argv in (("ls", "--store", store), ("pack", tmp_path / "m0", "--store", store)):
        line = one_line(fcsnap(*argv, env=bucket.env))
        assert f"'fcsnap init {store}'" in line
    assert bucket.listing("typo", marker=True) == []
    made = fcsnap("init", store, "--json", env=bucket.env)
    assert json.loads(made.stdout)["result"] == "created", made.stderr
    assert bucket.listing("typo", marker=True) == [MARKER]
    again = fcsnap("init", store, "--json", env=bucket.env)
    assert json.loads(again.stdout)["result"] == "exists"
    assert fcsnap("pack", tmp_path / "m0", "--store", store, "-q", env=bucket.env).returncode == 0

    fresh = bucket.url("fresh")
    packed = fcsnap("pack", "--init", tmp_path / "m0", "--store", fresh, "--name", "web", "-q",
                    env=bucket.env)
    assert packed.returncode == 0, packed.stderr
    assert MARKER in bucket.listing("fresh", marker=True) and "vms/web" in bucket.listing("fresh")

    obstore.put(bucket.client(), "other/notes.txt", b"mine")
    line = one_line(fcsnap("init", bucket.url("other"), env=bucket.env))
    assert "holds other files" in line and bucket.listing("other", marker=True) == ["notes.txt"]


def test_an_unmarked_bucket_is_known_by_its_first_objects(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An E2B/Wrenn bucket (never marked: nothing is written into it) or an older fcsnap's
    store in S3 is recognised by the first build object listed: a command does not list the
    whole bucket before it starts (thousands of requests for a large one)."""
    for i in range(200):
        obstore.put(bucket.client(), f"e2b/{uuid.UUID(int=i + 1)}/memfile.header", b"h")
    for key, value in bucket.server.env().items():
        monkeypatch.setenv(key, value)
    pages: list[int] = []
    listing = obstore.list

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        for page in listing(*args, **kwargs):
            pages.append(len(page))
            yield page

    monkeypatch.setattr(obstore, "list", counted)
    store = RemoteStore(S3Objects(parse_s3_url(bucket.url("e2b"))), tmp_path / "mirror")
    assert store.state() is State.UNMARKED
    assert len(pages) == 1 and sum(pages) < 200, pages


def test_an_older_s3_store_holding_only_leases_is_still_a_store(bucket: Bucket) -> None:
    """An unmarked store in S3 whose last build gc deleted while a lease was left (a restore
    SIGKILLed, a gc killed) holds only `leases/`: still a store, which gc can clean and init
    can mark, not a prefix of other objects."""
    obstore.put(bucket.client(), "old/leases/serve/0123abcd", b"{}")
    store = bucket.url("old")
    listed = fcsnap("ls", "--store", store, env=bucket.env)
    assert listed.returncode == 0, listed.stderr
    marked = fcsnap("init", store, "--json", env=bucket.env)
    assert marked.returncode == 0, marked.stderr
    assert json.loads(marked.stdout)["result"] == "adopted"


def test_an_unmarked_directory_is_known_by_its_first_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local E2B/Wrenn directory or an older store of many builds is recognised by the
    first build found, not by looking into every build directory (20,000 builds took every
    command, restore's start among them, a third of a second)."""
    for i in range(50):
        build = tmp_path / str(uuid.UUID(int=i + 1))
        build.mkdir()
        (build / "memfile.header").write_bytes(b"h")
    looked: list[str] = []
    is_build = marker._is_build

    def counted(store: Path, name: str) -> bool:
        looked.append(name)
        return is_build(store, name)

    monkeypatch.setattr(marker, "_is_build", counted)
    assert marker.local_state(tmp_path) is State.UNMARKED
    assert len(looked) == 1, looked
