"""Faults the torture harness (tests/torture/) found, each replayed deterministically on the real code:
cleaners racing a starting writer's lock, a dead taker's takeover marker, a resume of another world
size beside a live rank, a truncated plan, a dataset that grew, a full disk under compaction and
verify beside a compaction's unlinks, gc's leftovers, --overwrite of a newer store."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from prefixgen.builder.claims import _claim, _Holders
from prefixgen.format import BUILDS_DIR, CLAIMS_DIR, MANIFEST_FILE, PLAN_SUFFIX, RANK_PARTS_SUFFIX
from prefixgen.maintain.gc import collect_garbage
from prefixgen.maintain.verify import verify_store
from prefixgen.store import writer as writer_module
from prefixgen.store.reader import PrefixStore, read_builds
from prefixgen.store.writer import WriterLock, new_id, remove_lock_if_dead, writer_is_live
from tests.conftest import REPO, write_jsonl

CPU = ["--device", "cpu", "--dtype", "float32", "--quiet"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
WORDS = "the a cat dog sun tree big small happy sad ran jumped played saw red blue girl boy ball park home friend".split()


def _dataset(path: Path, n: int, start: int = 0) -> Path:
    """``n`` records sharing an opening sentence, each with words of its own (record ``start`` on)."""
    rows = []
    for i in range(start, start + n):
        words = " ".join(WORDS[(i * 7 + j * (i % 5 + 1)) % len(WORDS)] for j in range(30 + i % 20))
        rows.append({"text": f"Once upon a time there was a little girl. This is story {i}: {words}"})
    return write_jsonl(path, rows)


def test_a_cleaner_that_waited_to_lock_a_removed_lock_file_leaves_the_new_one(tmp_path, monkeypatch):
    # Item 1, replayed: writer W created its lock file (inode 1) and has not locked it yet. Cleaner B
    # opened inode 1 and is about to lock it; cleaner A locks it first, finds it free, unlinks it. W
    # locks inode 1, sees the path gone, and creates and locks inode 2. Then B's lock of inode 1
    # succeeds: it must not unlink the path, which names W's live lock now.
    store, owner = tmp_path, new_id()
    (store / "locks").mkdir()
    (store / "locks" / f"{owner}.lock").touch()  # W's open(O_CREAT), before its flock
    real_flock, at_flock, go_on = fcntl.flock, threading.Event(), threading.Event()

    def flock(fd, op):  # pauses cleaner B between its open and its flock; the real flock runs
        if threading.current_thread().name == "cleaner-B" and not at_flock.is_set():
            at_flock.set()
            go_on.wait(10)
        return real_flock(fd, op)

    monkeypatch.setattr(writer_module.fcntl, "flock", flock)
    result = {}
    b = threading.Thread(target=lambda: result.update(b=remove_lock_if_dead(store, owner)), name="cleaner-B")
    b.start()
    assert at_flock.wait(10)
    assert remove_lock_if_dead(store, owner)  # cleaner A
    w = WriterLock(store, owner)  # W retries: a new lock file, locked
    go_on.set()
    b.join(10)
    assert result["b"] is False
    assert (store / "locks" / f"{owner}.lock").exists() and writer_is_live(store, owner)
    w.release()


def test_a_takeover_marker_of_a_dead_taker_is_taken_over_in_turn(tmp_path):
    # Item 2: a rank died after creating <claim>.takeover-<holder> and before rewriting the claim.
    store = tmp_path
    (store / "locks").mkdir()
    claims = store / CLAIMS_DIR
    claims.mkdir()
    holder, taker, me = new_id(), new_id(), new_id()  # no lock is held for the first two: both dead
    claim = claims / "share-0"
    claim.write_text(f"{holder} 2026-01-01T00:00:00\n")
    (claims / f"share-0.takeover-{holder}").write_text(f"{taker} 2026-01-01T00:00:01\n")
    lock = WriterLock(store, me)
    try:
        assert _claim(claim, me, holders=_Holders(store))
        assert claim.read_text().split()[0] == me
        # A live taker's marker is respected: nobody else takes the claim from under it.
        other = new_id()
        claim.write_text(f"{holder} 2026-01-01T00:00:00\n")
        (claims / f"share-0.takeover-{holder}").write_text(f"{me} 2026-01-01T00:00:02\n")
        assert not _claim(claim, other, holders=_Holders(store))
    finally:
        lock.release()


@pytest.fixture
def half_built(tmp_path, cli, stories) -> tuple[Path, Path, str]:
    """A store where rank 0 of 2 finished its part of a --rank build and rank 1 has not run."""
    data = _dataset(tmp_path / "d.jsonl", 24)
    out = tmp_path / "store"
    result = cli("build", data, "--model", stories, "--out", out, *CPU, "--rank", 0, "--world-size", 2)
    assert result.exit_code == 0, result.output
    (build,) = read_builds(out)
    assert build.status == "running"
    return data, out, build.build_id


def test_a_resume_of_another_world_size_is_refused_while_a_rank_runs(half_built, cli, stories):
    # Item 5: rank 0 of the 2-rank run is (again) running; a --resume with 3 ranks would delete its part.
    data, out, build_id = half_built
    (part,) = (out / BUILDS_DIR / f"{build_id}{RANK_PARTS_SUFFIX}").glob("w2-r0.json")
    live = WriterLock(out, json.loads(part.read_text())["writers"][0])  # that rank's writer, alive
    try:
        result = cli("build", data, "--model", stories, "--out", out, *CPU, "--rank", 0, "--world-size", 3, "--resume")
        assert result.exit_code != 0
        assert "is still running" in result.output and "rank 0 of 2" in result.output, result.output
        assert part.exists()
        # Resumed as one process too (it would remove every rank's part and the plan).
        result = cli("build", data, "--model", stories, "--out", out, *CPU, "--resume")
        assert result.exit_code != 0 and "is still running" in result.output, result.output
        assert part.exists() and (out / BUILDS_DIR / f"{build_id}{PLAN_SUFFIX}").is_dir()
    finally:
        live.release()


def test_a_truncated_plan_is_one_clear_message(half_built, stories):
    # Item 6: under --no-fsync a power loss can leave a plan that was linked in but never written.
    data, out, build_id = half_built
    (plan,) = (out / BUILDS_DIR / f"{build_id}{PLAN_SUFFIX}").glob("*/plan-0.npz")
    plan.write_bytes(plan.read_bytes()[:100])
    cmd = [
        sys.executable,
        "-m",
        "prefixgen",
        "build",
        data,
        "--model",
        stories,
        "--out",
        out,
        *CPU,
        "--rank",
        1,
        "--world-size",
        2,
    ]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "truncated or damaged" in lines[-1] and "Traceback" not in proc.stderr, proc.stderr
    assert "Aborted" not in proc.stderr


def test_ranks_rerun_after_the_dataset_grew_store_the_new_records(half_built, cli, stories):
    # Item 8: the build id of --rank builds came from the options only: the rerun found the old
    # build complete and stored nothing of the new records.
    data, out, build_id = half_built
    assert cli("build", data, "--model", stories, "--out", out, *CPU, "--rank", 1, "--world-size", 2).exit_code == 0
    assert read_builds(out)[-1].status == "complete"
    grown = data.read_text() + _dataset(data.with_name("more.jsonl"), 8, start=100).read_text()
    data.write_text(grown)
    for rank in (0, 1):
        result = cli("build", data, "--model", stories, "--out", out, *CPU, "--rank", rank, "--world-size", 2, "--append")
        assert result.exit_code == 0, result.output
    store = PrefixStore.open(out)
    for line in grown.splitlines()[-8:]:
        ids = store_tokens(stories, json.loads(line)["text"])
        assert store.match(ids) == len(ids) // 16 * 16
    (new,) = [b for b in read_builds(out) if b.build_id != build_id]  # a build of its own (records files are in id order)
    assert new.status == "complete" and new.records == 32


def store_tokens(model: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)(text).input_ids


def _shim(tmp_path: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the fault shim (tests/torture/faultshim.c)")
    out = tmp_path / "faultshim.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", out, REPO / "tests" / "torture" / "faultshim.c", "-ldl"], check=True)
    return out


def _uncompacted_store(tmp_path: Path, model: Path, records: int) -> Path:
    """A store of one block per shard whose build could not compact its segments at the end (every
    write of a compacted segment fails, a build shrugs that off): one index segment per block."""
    data = _dataset(tmp_path / "d.jsonl", records)
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "prefixgen", "build", data, "--model", model, "--out", out, *CPU, "--shard-bytes", "20KiB"]
    env = {
        **ENV,
        "LD_PRELOAD": str(_shim(tmp_path)),
        "TORTURE_PREFIX": str(out / "index" / "compacted-"),
        "TORTURE_ENOSPC": "1000000",
    }
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for p in (out / "index").glob("*.tmp"):
        p.unlink()  # what an older prefixgen's failed compaction left
    return out


@pytest.mark.parametrize("fault", ["TORTURE_ENOSPC", "TORTURE_EIO"])
def test_compact_on_a_failing_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, stories, fault):
    # Item 11: a full disk (or an I/O error) under `compact` printed a traceback and left compacted-*.tmp.
    out = _uncompacted_store(tmp_path, stories, 6)
    before = sorted(p.name for p in (out / "index").iterdir())
    assert len(before) > 2
    env = {
        **ENV,
        "LD_PRELOAD": str(tmp_path / "faultshim.so"),
        "TORTURE_PREFIX": str(out / "index" / "compacted-"),
        fault: "1000000",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "prefixgen", "compact", str(out)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert not list(out.rglob("*.tmp")) and sorted(p.name for p in (out / "index").iterdir()) == before
    assert verify_store(out).ok


def test_compact_refuses_to_start_without_the_space_it_needs(tmp_path, stories, monkeypatch):
    # Item 11: compaction needs 2-3x the index free, and nothing checked it.
    from prefixgen.maintain import compact

    out = _uncompacted_store(tmp_path, stories, 6)
    size = sum(p.stat().st_size for p in (out / "index").iterdir())
    st = os.statvfs(out / "index")
    monkeypatch.setattr(compact, "SPACE_FACTOR", st.f_bavail * st.f_frsize / size + 1)  # one more than this disk has
    with pytest.raises(compact.StoreError, match="needs about .* free"):
        compact.compact_store(out)
    assert not list(out.rglob("*.tmp")) and len(list((out / "index").iterdir())) > 2


def test_verify_and_open_beside_a_compaction_of_many_segments(tmp_path, stories):
    # Item 4: opens (5 retries, no pause) and verify failed on a healthy store while a compaction
    # unlinked the segments it merged. The shim slows each unlink so the opens overlap them.
    out = _uncompacted_store(tmp_path, stories, 40)
    assert len(list((out / "index").iterdir())) > 100
    env = {**ENV, "LD_PRELOAD": str(tmp_path / "faultshim.so"), "TORTURE_PREFIX": str(out / "index"), "TORTURE_DELAY_US": "20000"}
    proc = subprocess.Popen([sys.executable, "-m", "prefixgen", "compact", str(out)], env=env, stderr=subprocess.PIPE, text=True)
    opens = 0
    while proc.poll() is None:
        PrefixStore.open(out)
        report = verify_store(out, quick=True)
        assert report.ok, report.faults
        opens += 1
    assert proc.wait() == 0, proc.stderr.read()
    assert opens > 2 and len(list((out / "index").iterdir())) == 1


def test_gc_removes_dead_writers_temporary_files_everywhere(tmp_path, half_built):
    # Item 12: gc skipped builds/*.ranks/, plan folders, claims/ and the store's own folder (and
    # states/: torture seed 4242 left a killed hybrid build's state file there).
    _, out, build_id = half_built
    dead = new_id()
    leftovers = [
        out / "states" / f"{'ab' * 32}.safetensors.{dead}.tmp",
        out / BUILDS_DIR / f"{build_id}{RANK_PARTS_SUFFIX}" / f"w2-r1.json.{dead}.tmp",
        next((out / BUILDS_DIR / f"{build_id}{PLAN_SUFFIX}").iterdir()) / f"share-1.npz.{dead}.tmp",
        out / CLAIMS_DIR / build_id / f"abc.{dead}.tmp",
        out / CLAIMS_DIR / build_id / f".clock-{dead}",
        out / f"{MANIFEST_FILE}.{dead}.tmp",
    ]
    for p in leftovers:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    live = new_id()
    lock = WriterLock(out, live)
    kept = out / CLAIMS_DIR / build_id / f".clock-{live}"
    kept.write_bytes(b"")
    try:
        report = collect_garbage(out)
    finally:
        lock.release()
    assert not [p for p in leftovers if p.exists()], report.removed
    assert kept.exists()


def test_overwrite_refuses_a_store_of_a_newer_format(tmp_path, cli, stories):
    # Item 12: --overwrite deleted a store this prefixgen cannot even read.
    data = _dataset(tmp_path / "d.jsonl", 4)
    out = tmp_path / "store"
    assert cli("build", data, "--model", stories, "--out", out, *CPU).exit_code == 0
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["format_version"] = 99
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    result = cli("build", data, "--model", stories, "--out", out, *CPU, "--overwrite")
    assert result.exit_code != 0 and "newer format" in result.output, result.output
    assert list((out / "shards").iterdir()) and json.loads((out / MANIFEST_FILE).read_text())["format_version"] == 99


def test_beegfs_without_global_locks_and_fuse_object_stores_are_refused(tmp_path):
    # Item 12: BeeGFS (locks per node by default) and FUSE mounts were not checked.
    from prefixgen.errors import StoreError
    from prefixgen.store.writer import check_file_system

    mounts = (
        "/dev/sda1 / ext4 rw 0 0\n"
        "beegfs_nodev /beegfs beegfs rw,relatime,cfgFile=/etc/beegfs/beegfs-client.conf 0 0\n"
        "bucket /s3 fuse.s3fs rw,nosuid 0 0\n"
        "fuse-overlayfs /merged fuse.fuse-overlayfs rw 0 0\n"
    )
    conf = tmp_path / "beegfs-client.conf"
    conf.write_text("connMgmtdPortTCP = 8008\ntuneUseGlobalFileLocks = false\n")
    with pytest.raises(StoreError, match="beegfs mounted with tuneUseGlobalFileLocks off"):
        check_file_system(Path("/beegfs/store"), mounts, beegfs_conf=conf)
    conf.write_text("tuneUseGlobalFileLocks = true  # shared\n")
    check_file_system(Path("/beegfs/store"), mounts, beegfs_conf=conf)
    with pytest.raises(StoreError, match="fuse.s3fs mounted with FUSE"):
        check_file_system(Path("/s3/store"), mounts)
    check_file_system(Path("/merged/store"), mounts)  # a local FUSE overlay: one machine's locks


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs of its own, for a really full disk (the fault shim can only fail writes, not free room)."""
    point = tmp_path / "disk"
    point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(point)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root, or no mount permission)")
    yield point
    subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_build_whose_disk_fills_up_records_how_it_ended(tmp_path, stories, small_disk):
    # Item 11, found again by torture seed 2727: another process filled the disk to its last page
    # while a build ran; the build failed with a clean message, but its record could not be written
    # either and stayed "running". The build keeps room for its last record and frees it then.
    data = _dataset(tmp_path / "d.jsonl", 600)
    out = small_disk / "store"
    cmd = [sys.executable, "-m", "prefixgen", "build", data, "--model", stories, "--out", out, *CPU, "--shard-bytes", "64KiB"]
    proc = subprocess.Popen([str(c) for c in cmd], env=ENV, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not [p for p in (out / "shards").glob("*") if not p.name.endswith(".tmp")]:
        threading.Event().wait(0.05)  # until the build committed blocks: they must count in its record
    hog = os.open(small_disk / "hog", os.O_WRONLY | os.O_CREAT)  # every page left, as another writer would
    with contextlib.suppress(OSError):
        while os.write(hog, bytes(4096)):
            pass
    os.close(hog)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, "the build finished before the disk filled: give it more records"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    (record,) = read_builds(out)
    assert record.status == "failed" and record.stored_tokens > 0
    assert not list(out.rglob("*.tmp"))


def _fill(disk: Path, name: str, leave: int = 0) -> None:
    """Take the free pages of ``disk`` but ``leave`` bytes, as another writer would (a file ``name``)."""
    fd = os.open(disk / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while (lambda st: st.f_bavail * st.f_frsize)(os.statvfs(disk)) > leave:
            os.write(fd, bytes(4096))
    except OSError:
        pass  # the disk is full
    finally:
        os.close(fd)


def _records_left_running(store: Path) -> list[str]:
    """Build records (a rank's parts included) that say "running" though a writer of theirs wrote them."""
    left = []
    for p in sorted((store / BUILDS_DIR).glob("**/*.json")):
        rec = json.loads(p.read_text())
        if rec.get("writers") and rec.get("status") == "running":
            left.append(str(p.relative_to(store)))
    return left


@pytest.mark.parametrize("free", ["16KiB", "roomy"])
def test_a_rank_whose_disk_is_full_records_how_it_ended(tmp_path, stories, small_disk, free):
    # Torture seed 4242: three --rank ranks started on a disk with 16 KiB free. Rank 1 wrote its
    # part "running", could not keep room for its last record, met the full disk and could not write
    # that record either: its part stayed "running". A rank keeps the room before any record exists
    # (16KiB: it fails at once, leaving no record), and writes its last record into it ("roomy": the
    # disk fills while the rank runs).
    data = _dataset(tmp_path / "d.jsonl", 300)
    out = small_disk / "store"
    if free == "16KiB":
        _fill(small_disk, "other", leave=16 << 10)
    cmd = [sys.executable, "-m", "prefixgen", "build", data, "--model", stories, "--out", out, *CPU]
    proc = subprocess.Popen([str(c) for c in [*cmd, "--rank", 1, "--world-size", 2]], env=ENV, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not list((out / BUILDS_DIR).glob(f"*{RANK_PARTS_SUFFIX}/w2-r1.json")):
        threading.Event().wait(0.02)  # until the rank's part says "running"
    _fill(small_disk, "hog")  # then every page left goes to another writer
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, "the rank finished before the disk filled: give it more records"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "is full" in err and "Traceback" not in err, err
    assert _records_left_running(out) == []
    assert not list(out.rglob("*.tmp"))
    if free == "roomy":
        (part,) = (out / BUILDS_DIR).glob(f"*{RANK_PARTS_SUFFIX}/w2-r1.json")
        assert json.loads(part.read_text())["status"] == "failed"


def test_a_claim_that_meets_a_full_disk_is_not_left_empty(small_disk):
    # An empty claim names no holder: the other ranks would wait out its whole lease (120 s) for it.
    (small_disk / "claims").mkdir()
    _fill(small_disk, "hog")
    with pytest.raises(OSError, match="No space left"):
        _claim(small_disk / "claims" / "share-1", new_id())
    assert not (small_disk / "claims" / "share-1").exists()


def test_a_count_share_that_fails_leaves_no_temporary_file(tmp_path, stories):
    # Item 11, found again by torture seed 3434: a rank whose share spill failed (EIO on its fsync, a short
    # write) ended with a clean message but left share-S.tokens/.keys temporaries in the plan folder.
    # Here the dataset's disk fails mid-share, as a read of it would.
    import errno

    from transformers import AutoTokenizer

    from prefixgen.builder.shares import count_share
    from prefixgen.data.records import RecordTokenizer
    from prefixgen.data.source import read_share
    from prefixgen.format import BlockHash, BuildRecord

    data = _dataset(tmp_path / "d.jsonl", 12)

    def failing_disk():
        for n, record in enumerate(read_share(str(data), "text", 1, 2, local_index=True)):
            if n == 3:
                raise OSError(errno.EIO, "Input/output error", str(data))
            yield record

    folder = tmp_path / "plan"
    folder.mkdir()
    tokenize = RecordTokenizer(AutoTokenizer.from_pretrained(stories), BuildRecord("", ""), 1024)
    with pytest.raises(OSError, match="Input/output error"):
        count_share(failing_disk(), tokenize, folder, 1, BlockHash(bytes(32)), 16, "w0", fsync=False)
    assert sorted(p.name for p in folder.iterdir()) == []
