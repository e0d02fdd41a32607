"""E2B/Wrenn builds served as they are (fixtures/e2b/, written by E2B's own code): `restore`
serves every generation's memory byte for byte to the stand-in VM, uncompressed or frame by
frame, refuses --verify in one line, and damaged data fails the restore cleanly."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import Procs, assert_served
from test_e2b_store import BUILDS, EXPECTED, FIXTURES, build_dir

from fcsnap.header import load_header
from fcsnap.store.operations.e2b import unpack_e2b


@pytest.fixture
def procs(tmp_path: Path):
    p = Procs(tmp_path)
    yield p
    p.close()


def memory_of(build: Path, tmp_path: Path, expected: dict) -> Path:
    """The generation's memory, as E2B's own code says it is (its SHA-256 in expected.json)."""
    out = tmp_path / f"{build.name}.mem"
    unpack_e2b(build, out)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected["memory_sha256"]
    return out


def serve(procs: Procs, build: Path, store: Path | None, memory: Path, *args: str,
          **vm: object):
    server = procs.server(build if store is None else build.name, store, *args)
    return procs.outcome(server, procs.vm(expected=memory, **vm))


def _newest_then_slow(builds: list[dict]) -> list:
    """Each scenario's newest generation (it reads its ancestors' objects too) in the default
    run; its older generations, the same mechanism on fewer ancestors, behind `slow`."""
    newest = {h["file"].split("/")[0]: h["file"] for h in builds}
    return [pytest.param(h, id=h["file"], marks=() if newest[h["file"].split("/")[0]] ==
                         h["file"] else pytest.mark.slow) for h in builds]


@pytest.mark.parametrize("expected", _newest_then_slow(BUILDS))
def test_restore_serves_each_generation_e2b_wrote(expected, procs, tmp_path):
    build = build_dir(expected)
    memory = memory_of(build, tmp_path, expected)
    out = serve(procs, build, None, memory, threads=2, order="random", seed=1)
    page = 4096
    stats = assert_served(out.vm_status, out.status, out.stderr, out.report, out.stats,
                          pages=memory.stat().st_size // page)
    data_builds = {m[2] for m in expected["mappings"]} - {str(bytes(16).hex())}
    assert set(stats["per_build_pages"]) <= {*data_builds,
                                             "00000000-0000-0000-0000-000000000000"}


def test_restore_by_id_in_the_store(procs, tmp_path):
    expected = EXPECTED["v5-lz4-4k"][2]
    build = build_dir(expected)
    memory = memory_of(build, tmp_path, expected)
    out = serve(procs, build, build.parent, memory)
    assert_served(out.vm_status, out.status, out.stderr, out.report, out.stats)


def test_verify_is_refused_in_one_line(procs, tmp_path):
    build = build_dir(EXPECTED["v4-zstd-4k"][2])
    server = procs.server(build, None, "--verify")
    out = procs.outcome(server, None)
    assert out.status == 2
    assert "--verify" in out.error and "E2B/Wrenn" in out.error


def _damaged(tmp_path: Path, scenario: str, generation: int) -> tuple[Path, Path]:
    """A writable copy of a scenario and its build of `generation` (1-based)."""
    store = tmp_path / scenario
    shutil.copytree(FIXTURES / scenario, store)
    build = store / Path(EXPECTED[scenario][generation - 1]["file"]).parent.name
    return store, build


def _first_frame(build: Path) -> tuple[Path, int, int]:
    """The compressed object of `build` and its first frame's compressed range."""
    header = load_header(build / "memfile.header")
    entry = header.builds_section.builds[header.metadata.build_id]
    frame = entry.frames[0]
    return build / f"memfile.{entry.compression}", frame.start_c, frame.size_c


def test_a_damaged_frame_fails_the_restore_and_kills_the_vm(procs, tmp_path):
    """A flipped byte inside a zstd frame: its checksum fails, no page of it is installed."""
    expected = EXPECTED["v4-zstd-4k"][0]
    memory = memory_of(build_dir(expected), tmp_path, expected)
    _, build = _damaged(tmp_path, "v4-zstd-4k", 1)
    obj, start, size = _first_frame(build)
    data = bytearray(obj.read_bytes())
    data[start + size // 2] ^= 0xFF
    obj.write_bytes(bytes(data))
    out = serve(procs, build, None, memory)
    assert out.status == 1 and out.vm_status != 0
    assert "frame 0" in out.error
    assert out.report is None or out.report["mismatches"] == 0


@pytest.mark.parametrize("damage", ["truncated", "missing", "absent build", "incomplete"])
def test_missing_or_short_objects_are_refused_before_serving(damage, procs, tmp_path):
    """A truncated object, a missing one, a header naming a build not in the store, or one
    marked incomplete (upload pending): one line, before the socket listens (no VM ever runs
    on a wrong page)."""
    store, build = _damaged(tmp_path, "v4-zstd-4k", 3)
    template = store / Path(EXPECTED["v4-zstd-4k"][0]["file"]).parent.name
    obj = template / "memfile.zstd"
    if damage == "incomplete":  # the header a peer sends while the upload is under way
        shutil.copy(store / f"peer-{build.name}.header", build / "memfile.header")
    elif damage == "truncated":
        obj.write_bytes(obj.read_bytes()[:-100])
    elif damage == "missing":
        obj.unlink()
    else:
        shutil.rmtree(template)
    out = procs.outcome(procs.server(build, None), None)
    assert out.status == 1
    assert {"truncated": "frame table ends", "missing": "memfile.zstd",
            "absent build": "is not in", "incomplete": "marked incomplete"}[damage] in out.error
    assert not procs.socket.exists()


def test_daemon_serves_e2b_builds_side_by_side(tmp_path):
    """`fcsnap serve` over a directory laid out as E2B's bucket: four VMs at once from
    LZ4-framed, zstd-framed and uncompressed builds sharing ancestors, every byte checked;
    verify is refused with 400 and listens on nothing."""
    from test_daemon import Build, Daemon

    store = tmp_path / "bucket"
    for scenario in ("v5-lz4-4k", "v4-on-v3-4k"):
        shutil.copytree(FIXTURES / scenario, store, dirs_exist_ok=True)
    picks = [EXPECTED["v5-lz4-4k"][2], EXPECTED["v5-lz4-4k"][1],
             EXPECTED["v4-on-v3-4k"][1], EXPECTED["v4-on-v3-4k"][0]]
    daemon = Daemon(store, tmp_path)
    try:
        status, answer = daemon.call("POST", "/restores", {
            "vm": str(picks[0]["build_id"]), "socket": str(tmp_path / "v.sock"), "verify": True})
        assert status == 400 and "--verify" in answer["error"], answer
        assert not (tmp_path / "v.sock").exists()
        vms = []
        for n, expected in enumerate(picks):
            memory = memory_of(build_dir(expected), tmp_path, expected)
            daemon.restore(expected["build_id"], f"vm{n}")
            build = Build(f"vm{n}", expected["build_id"], memory)
            vms.append(daemon.vm(f"vm{n}", build, threads=2, order="random", seed=n))
        for n, vm in enumerate(vms):
            vm.communicate(timeout=60)
            report = daemon.report(f"vm{n}")
            assert vm.returncode == 0 and report is not None, report
            assert report["mismatches"] == 0 and report["pages_touched"] > 0
        assert daemon.stop()[0] == 0
    finally:
        daemon.close()


def test_daemon_refuses_a_checkpoint_of_an_e2b_build(tmp_path):
    """A checkpoint is the next generation of an fcsnap build: asked of a restore serving an
    E2B/Wrenn build, the daemon refuses it in one line saying so (409), before pausing or
    reading anything, and the restore goes on."""
    from test_daemon import Daemon

    store = tmp_path / "bucket"
    shutil.copytree(FIXTURES / "v5-lz4-4k", store)
    expected = EXPECTED["v5-lz4-4k"][1]
    daemon = Daemon(store, tmp_path)
    try:
        answer = daemon.restore(str(expected["build_id"]), "vm", track_writes=True)
        status, refused = daemon.call("POST", f"/restores/{answer['id']}/checkpoint",
                                      {"name": "next"})
        assert status == 409 and "E2B/Wrenn build" in refused["error"], refused
        assert "\n" not in refused["error"]
        status, state = daemon.call("GET", f"/restores/{answer['id']}")
        assert status == 200 and state.get("last_checkpoint") is None, state
        assert not (store / "vms").exists()  # nothing published
        assert daemon.stop()[0] == 0
    finally:
        daemon.close()


def upload(bucket, scenario: str, prefix: str = "snaps", root: Path = FIXTURES) -> None:
    """A fixture scenario (or a copy of one under `root`) as E2B lays out its bucket:
    `<prefix>/<build_id>/<object>`."""
    import obstore

    client = bucket.client()
    for path in sorted((root / scenario).rglob("*")):
        if path.is_file() and path.parent != root / scenario:
            key = f"{prefix}/{path.relative_to(root / scenario)}"
            obstore.put(client, key, path.read_bytes())


S3_CASES = [("v4-zstd-4k", 3), ("v5-lz4-4k", 2), ("v4-on-v3-4k", 2), ("v5-zstd-2m", 2)]
S3_SLOW = {"v4-on-v3-4k"}  # a V3 parent's header: read as in a directory, served above


@pytest.mark.parametrize(("scenario", "generation"), [
    pytest.param(s, g, id=f"{s}-gen{g}", marks=pytest.mark.slow if s in S3_SLOW else ())
    for s, g in S3_CASES])
def test_restore_from_an_e2b_bucket(scenario, generation, bucket, procs, tmp_path):
    """Frames (and an uncompressed object's pieces) fetched through the host chunk cache:
    cold, then warm with no fetch; every byte checked; nothing written into the bucket."""
    from s3_helpers import restore_from

    upload(bucket, scenario)
    before = bucket.listing()
    expected = EXPECTED[scenario][generation - 1]
    memory = memory_of(build_dir(expected), tmp_path, expected)
    cache = tmp_path / "cache"
    for run in ("cold", "warm"):
        server = procs.track(restore_from(bucket, expected["build_id"], procs.socket, cache,
                                          stats=procs.stats))
        out = procs.outcome(server, procs.vm(expected=memory, threads=2, order="random"))
        stats = assert_served(out.vm_status, out.status, out.stderr, out.report, out.stats,
                              pages=memory.stat().st_size // 4096)
        if run == "warm":
            assert stats["fetch_requests"] == 0 and stats["cache_hits"] > 0, stats
        else:
            assert stats["fetch_requests"] == stats["cache_misses"] > 0, stats
    assert bucket.listing() == before


def test_an_e2b_bucket_refuses_verify_and_a_damaged_frame(bucket, procs, tmp_path):
    """--verify: one line, exit 2. A frame damaged in the bucket: never installed, the VM
    killed. An object gone from the bucket: one line before the socket listens."""
    import obstore

    upload(bucket, "v4-zstd-4k")
    expected = EXPECTED["v4-zstd-4k"][0]
    from s3_helpers import restore_from

    server = procs.track(restore_from(bucket, expected["build_id"], procs.socket,
                                      tmp_path / "cache", "--verify", stats=procs.stats))
    out = procs.outcome(server, None)
    assert out.status == 2 and "--verify" in out.error
    obj, start, size = _first_frame(build_dir(expected))
    data = bytearray(obj.read_bytes())
    data[start + size // 2] ^= 0xFF
    obstore.put(bucket.client(), f"snaps/{expected['build_id']}/memfile.zstd", bytes(data))
    memory = memory_of(build_dir(expected), tmp_path, expected)
    server = procs.track(restore_from(bucket, expected["build_id"], procs.socket,
                                      tmp_path / "cache2", stats=procs.stats))
    out = procs.outcome(server, procs.vm(expected=memory))
    assert out.status == 1 and out.vm_status != 0 and "frame 0" in out.error
    assert out.report is None or out.report["mismatches"] == 0
    obstore.delete(bucket.client(), f"snaps/{expected['build_id']}/memfile.zstd")
    head = EXPECTED["v4-zstd-4k"][2]["build_id"]  # reads the template's object, now gone
    server = procs.track(restore_from(bucket, head, procs.socket, tmp_path / "cache3",
                                      stats=procs.stats))
    out = procs.outcome(server, None)
    assert out.status == 1 and "memfile.zstd: data object missing" in out.error
    assert not procs.socket.exists()


def test_daemon_serves_an_e2b_bucket(bucket, tmp_path, monkeypatch):
    """`fcsnap serve --store s3://...` over E2B's bucket layout: two VMs from an LZ4 lineage
    through the one host cache, every byte checked; verify refused with 400."""
    from test_daemon import Build, Daemon

    upload(bucket, "v5-lz4-4k")
    for key, value in bucket.server.env().items():
        monkeypatch.setenv(key, value)
    daemon = Daemon(bucket.url(), tmp_path, "--cache-dir",  # type: ignore[arg-type]
                    str(tmp_path / "cache"), "--fetch-timeout", "10")
    try:
        head = EXPECTED["v5-lz4-4k"][2]
        status, answer = daemon.call("POST", "/restores", {
            "vm": head["build_id"], "socket": str(tmp_path / "v.sock"), "verify": True})
        assert status == 400 and "--verify" in answer["error"], answer
        vms = []
        for n, expected in enumerate([head, EXPECTED["v5-lz4-4k"][1]]):
            memory = memory_of(build_dir(expected), tmp_path, expected)
            daemon.restore(expected["build_id"], f"vm{n}")
            vms.append(daemon.vm(f"vm{n}", Build(f"vm{n}", expected["build_id"], memory),
                                 order="random", seed=n))
        for n, vm in enumerate(vms):
            vm.communicate(timeout=60)
            report = daemon.report(f"vm{n}")
            assert vm.returncode == 0 and report is not None and report["mismatches"] == 0
        assert daemon.stop()[0] == 0
    finally:
        daemon.close()


def test_the_frames_a_bucket_build_reads_are_fetched_behind_the_guest(bucket, procs, tmp_path):
    """A guest that reads one page: the rest of what its memory maps (every frame of every
    build the head reads, and no other frame) lands in the host cache in the background."""
    from s3_helpers import restore_from

    from fcsnap.store.operations.e2b import _all_mapped_frames, open_e2b

    upload(bucket, "v4-zstd-4k")
    expected = EXPECTED["v4-zstd-4k"][2]
    with open_e2b(build_dir(expected)) as lineage:
        want = {d.cache_key: sorted(f"{d.frames[i].start_c:08d}"  # named by their offset
                                    for i in _all_mapped_frames(lineage, d))
                for d in lineage.builds.values()}
    cache = tmp_path / "cache"

    def cached() -> dict[str, list[str]]:  # a bucket's keys add the store's to the object's
        return {key: sorted(p.name for p in cache.glob(f"{key}-*/0*")) for key in want}

    server = procs.track(restore_from(bucket, expected["build_id"], procs.socket, cache,
                                      stats=procs.stats))
    memory = memory_of(build_dir(expected), tmp_path, expected)
    vm = procs.vm(expected=memory, touch=1 / 256, hold=30)
    from helpers import wait_for

    wait_for(lambda: cached() == want, f"the cache to hold {want}")
    vm.kill()
    server.wait(timeout=30)


def test_a_working_set_in_a_bucket_is_fetched_first(bucket, procs, tmp_path):
    """--prefetch-ws --lazy-fetch from an E2B bucket: the frames holding the working set are
    fetched as the socket listens, and no other; the VM then gets every byte right."""
    import time

    from helpers import wait_for
    from s3_helpers import restore_from

    from fcsnap.store.operations.e2b import open_e2b
    from fcsnap.workingset import write_working_set

    upload(bucket, "v4-zstd-4k")
    expected = EXPECTED["v4-zstd-4k"][0]
    with open_e2b(build_dir(expected)) as lineage:
        (build_id, data), = lineage.builds.items()
        key = data.cache_key
        mapped = [m for m in lineage.header.mappings if m.build_id == build_id]
        target = data.frame_index(mapped[-1].storage_offset)  # the last mapped run's frame
        ws = [m.offset + at for m in mapped for at in range(0, m.length, 4096)
              if data.frame_index(m.storage_offset + at) == target]
        target = data.frames[target].start_c  # what the cache names it by
    path = tmp_path / "ws"
    write_working_set(path, expected["size"], ws)
    cache = tmp_path / "cache"

    def cached() -> set[int]:
        return {int(p.name) for p in cache.glob(f"{key}-*/0*")}

    server = procs.track(restore_from(bucket, expected["build_id"], procs.socket, cache,
                                      "--prefetch-ws", str(path), "--lazy-fetch",
                                      stats=procs.stats))
    wait_for(lambda: target in cached(), "the working set's frame")
    time.sleep(0.5)
    assert cached() == {target}
    memory = memory_of(build_dir(expected), tmp_path, expected)
    out = procs.outcome(server, procs.vm(expected=memory))
    assert_served(out.vm_status, out.status, out.stderr, out.report, out.stats)
    assert out.stats["prefetched_pages"] == len(ws)


def _one_big_frame_build(store: Path) -> Path:
    """A build whose only frame holds more than the 64 MiB a frame may hold uncompressed (its
    first pages data, the rest zeros: a few KiB compressed); the memory maps its first page."""
    import hashlib
    import os
    import uuid

    import zstandard

    from fcsnap.header import NIL, to_records
    from fcsnap.header.e2b import BuildInfo, Frame, encode_v4_body
    from fcsnap.header.format import METADATA, Mapping
    from fcsnap.store.operations.e2b import MAX_FRAME

    build_id = uuid.UUID("e2b00009-0000-4000-8000-000000000001")
    diff = os.urandom(16 * 4096) + bytes(MAX_FRAME)
    packed = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(diff)
    entry = BuildInfo(build_id, len(diff), hashlib.sha256(diff).digest(), "zstd",
                      (Frame(0, 0, len(diff), len(packed)),))
    records = to_records([Mapping(0, 16 * 4096, build_id, 0)])
    build = store / str(build_id)
    build.mkdir(parents=True)
    (build / "memfile.zstd").write_bytes(packed)
    (build / "memfile.header").write_bytes(
        METADATA.pack(4, 4096, 16 * 4096, 1, build_id.bytes, NIL.bytes)
        + encode_v4_body([entry], records))
    return build


def test_a_frame_beyond_the_size_cap_is_refused_before_serving(procs, tmp_path):
    """A frame claiming more than 64 MiB uncompressed is refused before the socket listens,
    as unpack refuses it: never decoded into the server's memory at a fault."""
    build = _one_big_frame_build(tmp_path / "store")
    server = procs.server(build, None, "--handshake-timeout", "5")
    out = procs.outcome(server, None)
    assert out.status == 1
    assert "frame 0" in out.error and "uncompressed is beyond" in out.error, out.error
    assert not procs.socket.exists()


def test_two_buckets_holding_one_build_id_never_share_a_cached_piece(bucket, procs, tmp_path):
    """The same E2B build id with other bytes of the same size under another prefix (a staging
    copy, say), restored through the same host cache: each VM gets its own store's bytes,
    never a piece the other store's restore cached."""
    from s3_helpers import restore_from

    from fcsnap.store.operations.e2b import unpack_e2b

    scenario = "v4-none-4k"
    expected = EXPECTED[scenario][0]
    upload(bucket, scenario)
    store, build = _damaged(tmp_path, scenario, 1)
    obj = build / "memfile"
    obj.write_bytes(bytes(b ^ 0x5A for b in obj.read_bytes()))
    upload(bucket, scenario, prefix="other", root=tmp_path)
    memories = {"snaps": memory_of(build_dir(expected), tmp_path, expected),
                "other": tmp_path / "other.mem"}
    unpack_e2b(build, memories["other"])
    assert memories["other"].read_bytes() != memories["snaps"].read_bytes()
    cache = tmp_path / "cache"
    for prefix, memory in memories.items():
        server = procs.track(restore_from(bucket, expected["build_id"], procs.socket, cache,
                                          stats=procs.stats, prefix=prefix))
        out = procs.outcome(server, procs.vm(expected=memory, threads=2, order="random"))
        stats = assert_served(out.vm_status, out.status, out.stderr, out.report, out.stats)
        assert stats["fetch_requests"] > 0, (prefix, stats)


def test_daemon_requests_for_two_bucket_builds_at_once_both_open(bucket, tmp_path, monkeypatch):
    """Two POSTs at once (the daemon's request threads): each resolves its build in the bucket,
    then opens it. The second resolve comes between the first one's resolve and its opening:
    the first build still opens with its own objects as listed, not "missing"."""
    from fcsnap.daemon.remote import RemoteBuilds
    from fcsnap.store.backends.chunk_cache import ChunkCache
    from fcsnap.store.backends.stores import open_store
    from fcsnap.uffd.shared import BuildRegistry

    upload(bucket, "v4-zstd-4k")
    for key, value in bucket.server.env().items():
        monkeypatch.setenv(key, value)
    store = open_store(bucket.url(), 10)
    builds = RemoteBuilds(store, ChunkCache(tmp_path / "cache"), 10)
    registry = BuildRegistry(8 << 20, store)
    picks = [EXPECTED["v4-zstd-4k"][2], EXPECTED["v4-zstd-4k"][1]]
    resolved = [builds.resolve(expected["build_id"]) for expected in picks]
    for path, expected in zip(resolved, picks, strict=True):
        build = registry.acquire(path)
        try:
            assert str(build.build_id) == expected["build_id"]
            assert set(map(str, build.diffs)) == {m[2] for m in expected["mappings"]} - {
                "00000000-0000-0000-0000-000000000000"}
        finally:
            registry.release(build)


def test_two_heads_trimming_an_ancestors_table_differently_share_no_wrong_frame(
        bucket, procs, tmp_path):
    """An ancestor whose own header is gone from the bucket is read through each head's
    trimmed table, whose frame numbers differ between heads. Restored one after the other
    through one host cache, with incompressible frames (all of one compressed size), each VM
    still gets its own memory: a cached frame is the object's bytes at its offset, not at
    another table's index."""
    import os

    import obstore
    from helpers import fcsnap
    from s3_helpers import restore_from

    page, frame = 4096, 64 << 10
    memories = [bytearray(os.urandom(1 << 20))]
    for rewrite in (range(0, 16), range(16, 32)):  # the next generation rewrites one frame more
        memories.append(bytearray(memories[-1]))
        for p in rewrite:
            memories[-1][p * page : (p + 1) * page] = os.urandom(page)
    store, out = tmp_path / "store", tmp_path / "e2b"
    paths = []
    for n, memory in enumerate(memories):
        paths.append(tmp_path / f"gen{n}.mem")
        paths[-1].write_bytes(memory)
        argv = ("pack", "--init", paths[-1]) if n == 0 else ("diff", paths[-1], "--base", "vm")
        result = fcsnap(*argv, "--store", store, "--name", "vm", "--json")
        assert result.returncode == 0, result.stderr
    result = fcsnap("export", "vm", "--store", store, "-o", out, "--compress", "zstd",
                    "--frame-size", str(frame))
    assert result.returncode == 0, result.stderr
    generations = json.loads(fcsnap("ls", "vm", "--store", store, "--json").stdout)["generations"]
    ids = [g["build_id"] for g in sorted(generations, key=lambda g: g["generation"])]
    (out / ids[0] / "memfile.header").unlink()
    for path in sorted(out.rglob("*")):
        if path.is_file():
            obstore.put(bucket.client(), f"snaps/{path.relative_to(out)}", path.read_bytes())
    cache = tmp_path / "cache"
    for build_id, memory in zip(ids[1:], paths[1:], strict=True):
        server = procs.track(restore_from(bucket, build_id, procs.socket, cache,
                                          stats=procs.stats))
        served = procs.outcome(server, procs.vm(expected=memory, threads=2, order="random"))
        assert_served(served.vm_status, served.status, served.stderr, served.report,
                      served.stats)


def test_a_build_directory_not_named_by_its_build_id_is_refused(procs, tmp_path):
    """A copy of a head under another name (`cp -r ID ID-backup`) would be served from the
    directory its header names, not from the copy: refused before listening, as unpack
    refuses it."""
    store, build = _damaged(tmp_path, "v4-zstd-4k", 3)
    copy = store / f"{build.name}-backup"
    shutil.copytree(build, copy)
    out = procs.outcome(procs.server(copy, None), None)
    assert out.status == 1 and "directory name is not its build id" in out.error
    assert not procs.socket.exists()
