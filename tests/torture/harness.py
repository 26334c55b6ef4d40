"""The store torture harness: randomized schedules, from a seed, of concurrent prefixgen processes on
one store, with kill -9 at random points and injected I/O faults, checked against invariants after
every step (SQLite's crash and I/O-error tests, FoundationDB's simulation, Jepsen's histories).

A schedule is a fresh store and a few steps. A step starts several real ``prefixgen`` processes at
once (builds, appends, ``--rank`` builds of some world size and their ``--resume`` with another,
compact, prune, gc, verify, readers that keep loading, cleaners that run gc in a loop, ``serve``),
kills some with SIGKILL at a random moment after they took their lock, lets the rest end, and checks:

* ``verify`` passes (the harness's own prefixgen checks the store);
* every record of every complete build (of a dataset not pruned since) is stored, and its KV
  equals a reference store's (built alone, before; within the float32 batch-equivalence tolerance:
  different batch compositions do not give bit-equal floats) and no complete build counts more
  records than its dataset has;
* no live writer's lock file was deleted (seen through ``/proc/<pid>/fd``: a lock still held,
  unlinked);
* a process that ended on its own left no temporary file and no build record ``running``;
* after ``gc`` (nothing running), no temporary, orphaned or abandoned file is left;
* readers (and ``serve``) never see an error other than "not stored";
* every failure is one line ``error: ...`` (no traceback, no "Aborted!").

A third of the schedules build a tiny hybrid model (Qwen3-Next: Gated DeltaNet layers beside
attention), whose stores keep recurrent states in ``states/``: after gc, every state file is of a
block the index holds.

Faults: ``faultshim.c`` (LD_PRELOAD, compiled here) fails writes and fsyncs under the store with EIO
or ENOSPC, shortens writes, and delays flock/unlink/rename/link to widen race windows; a schedule
on a small tmpfs (mounted here when the machine allows it) meets a real full disk. With ``--cover``
(CI's slice) the shim also fails one chosen writer's k-th write after its lock, and holds another at
its n-th store operation after its lock until the harness kills it: the slice meets an injected
fault and a kill -9 of a live writer mid-job on a loaded machine as on a quiet one.

Run: ``python -m tests.torture.harness --seed 1 --minutes 10 [--code DIR]`` (``--code``: the
prefixgen checkout the children run, e.g. an older one; the harness itself checks with its own).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MODEL = REPO / "models" / "stories260K"
SMALL_SHARDS = ("20KiB", "64KiB", "1MiB")  # 1, 3 and ~50 blocks of stories260K per shard
HYBRID_SHARE = 1 / 3  # schedules whose model is a hybrid (recurrent states in states/)
COVER_MAX_STEPS = 10  # --cover: steps a schedule may take to meet everything (a forced target may be refused before its lock)
HOLD_OPS = 60  # --cover's forced kill: at most this many operations under the store after the lock (else at the release)
FAIL_OPS = 12  # --cover's forced fault: the k-th write or fsync after the lock, k at most this
TOLERANCE = 1e-5  # float32 batch equivalence, as tests/test_distributed.py's assert_same_kv
WORDS = "the cat sat on a mat and ran to the big red dog who saw tim and lily play with a ball in the park".split()


@dataclass
class Violation:
    schedule: int
    step: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"[schedule {self.schedule}, {self.step}] {self.kind}: {self.detail}"


@dataclass
class Report:
    seed: int
    schedules: int = 0
    steps: int = 0
    processes: int = 0
    kills: int = 0
    faults: int = 0  # injected by the shim (EIO, ENOSPC, short writes)
    full_disks: int = 0  # processes that met the small tmpfs full
    ran: dict[str, int] = field(default_factory=dict)  # steps of each kind and maintenance jobs started
    violations: list[Violation] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        head = (
            f"seed {self.seed}: {self.schedules} schedules, {self.steps} steps, {self.processes} processes, "
            f"{self.kills} kill -9, {self.faults} injected faults, {self.full_disks} full-disk failures, "
            f"{len(self.violations)} violations"
        )
        ran = ", ".join(f"{k} {n}" for k, n in sorted(self.ran.items()))
        lines = [head, f"  ran: {ran}", *(f"  skipped: {s}" for s in self.skipped)]
        seen = set()
        for v in self.violations:
            key = (v.kind, v.detail[:160])
            if key not in seen:
                seen.add(key)
                lines.append(f"  {v}")
        return "\n".join(lines)


@dataclass
class Planned:
    """A child of a step before it starts: ``--cover`` picks among them whom to kill and fault."""

    name: str
    cmd: list
    role: str
    faults: bool
    rates: dict
    kill_after: float | None
    dataset: str | None = None
    hold: Path | None = None


@dataclass
class Child:
    name: str
    cmd: list[str]
    proc: subprocess.Popen
    started: float
    kill_after: float | None  # seconds after it took its lock (None: let it end)
    role: str  # build | ranks | maint | verify | reader | cleaner | serve
    dataset: str | None = None
    locked_at: float | None = None
    hold: Path | None = None  # --cover's forced kill: the shim creates it where it holds the process for its kill
    killed: bool = False  # a kill -9 ended it (not sent to one that had ended on its own)
    out: str = ""
    err: str = ""


def make_datasets(folder: Path, seed: int) -> dict[str, Path]:
    """Three datasets: ``a`` (records sharing system prompts), ``a+`` (``a`` grown by more records)
    and ``b`` (other records)."""
    rng = random.Random(seed)
    systems = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(3)]

    def record() -> str:
        return json.dumps({"text": f"{rng.choice(systems)} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 60)))})

    a = [record() for _ in range(24)]
    grown = a + [record() for _ in range(12)]
    b = [record() for _ in range(20)]
    out = {}
    for name, lines in (("a", a), ("a+", grown), ("b", b)):
        p = folder / f"{name.replace('+', 'plus')}.jsonl"
        p.write_text("\n".join(lines) + "\n")
        out[name] = p
    return out


class Torture:
    def __init__(
        self, work: Path, seed: int, code: Path = REPO, log=print, mix: tuple[str, ...] = (), cover: bool = False
    ):  # fmt: skip
        self.work, self.seed, self.code, self.log = work, seed, code, log
        self.mix = mix  # step kinds to draw from (all when empty): to aim a run at one kind of fault
        # Draw first what has not run yet (step kinds, compact/prune/gc, injected faults, a kill -9):
        # a short run (CI's slice) meets every kind of trouble, in an order and at moments the seed gives.
        self.cover = cover
        self.rng = random.Random(seed)
        self.kind_rng = random.Random(f"{seed}-kind")
        self.report = Report(seed)
        self.work.mkdir(parents=True, exist_ok=True)
        self.fault_log = self.work / "faults.log"
        self.shim = self._compile_shim()
        self.tmpfs: Path | None = None

    # ------------------------------------------------------------------ set-up

    def _compile_shim(self) -> Path | None:
        out = self.work / "faultshim.so"
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            self.report.skipped.append("no C compiler: EIO/short-write injection and race delays are off")
            return None
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", out, HERE / "faultshim.c", "-ldl"], check=True)
        return out

    def setup(self) -> None:
        """Datasets, their token ids (for readers) and a reference store of each, built alone."""
        from transformers import AutoTokenizer

        self.data = make_datasets(self.work, self.seed)
        tok = AutoTokenizer.from_pretrained(MODEL)
        prompts = [tok(json.loads(line)["text"]).input_ids for line in self.data["a+"].read_text().splitlines()]
        prompts += [tok(json.loads(line)["text"]).input_ids for line in self.data["b"].read_text().splitlines()]
        self.prompts = self.work / "prompts.json"
        self.prompts.write_text(json.dumps(prompts[::3]))
        self.texts = [json.loads(line)["text"] for line in self.data["b"].read_text().splitlines()][:4]
        self.models = {"plain": MODEL, "hybrid": _hybrid_model(self.work / "hybrid")}
        self.refs: dict[str, dict[str, Path]] = {}
        self.ref_keys: dict[str, dict[str, list[bytes]]] = {}
        self._references("plain")

    def _references(self, kind: str) -> None:
        """A reference store of each dataset, built alone with the ``kind`` model (once)."""
        if kind in self.refs:
            return
        tag = "" if kind == "plain" else f"{kind}-"
        refs = self.refs[kind] = {name: self.work / f"ref-{tag}{name.replace('+', 'plus')}" for name in self.data}
        procs = []
        for name, ref in refs.items():
            if not (ref / "manifest.json").exists():
                shutil.rmtree(ref, ignore_errors=True)
                procs.append(subprocess.Popen(self._cli("build", self.data[name], "-m", self.models[kind], "--out", ref, "--quiet"), env=self._env(faults=False), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=self.code))  # fmt: skip
        for p in procs:
            _, err = p.communicate()
            if p.returncode:
                raise RuntimeError(f"reference build failed: {err}")
        from prefixgen.store.reader import PrefixStore

        self.ref_keys[kind] = {}
        for name, ref in refs.items():
            index = PrefixStore.open(ref).index
            self.ref_keys[kind][name] = sorted(
                {bytes(k) for s in index.segments for k in index.columns(index.segments.index(s))["key"]}
            )

    # ------------------------------------------------------------------ processes

    def _cli(self, *args) -> list[str]:
        return [sys.executable, "-m", "prefixgen", *map(str, args)]

    def _env(self, faults: bool, store: Path | None = None, rates: dict | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TORTURE_")}
        env.update(PYTHONPATH=str(self.code), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env.update(OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="0")
        if faults and self.shim is not None and store is not None:
            env.update(
                LD_PRELOAD=str(self.shim),
                TORTURE_PREFIX=str(store),
                TORTURE_LOG=str(self.fault_log),
                TORTURE_SEED=str(self.rng.randrange(1 << 30)),
                **{k: str(v) for k, v in (rates or {}).items()},
            )
        return env

    def _start(
        self,
        name: str,
        cmd: list,
        role: str,
        env: dict,
        kill_after: float | None,
        dataset: str | None = None,
        hold: Path | None = None,
    ) -> Child:
        # Output to files, read when the process has ended: a pipe nobody drains would block it.
        n = self.report.processes
        out, err = self.work / "logs" / f"{n}.out", self.work / "logs" / f"{n}.err"
        out.parent.mkdir(exist_ok=True)
        with open(out, "w") as fo, open(err, "w") as fe:
            # cwd: `python -m prefixgen` and `python -c` put it first on sys.path, before PYTHONPATH.
            proc = subprocess.Popen(
                [str(c) for c in cmd], env=env, stdout=fo, stderr=fe, text=True, start_new_session=True, cwd=self.code
            )
        self.report.processes += 1
        child = Child(name, [str(c) for c in cmd], proc, time.monotonic(), kill_after, role, dataset, hold=hold)
        child.files = (out, err)  # type: ignore[attr-defined]
        return child

    # ------------------------------------------------------------------ schedules

    def run(self, seconds: float, max_schedules: int | None = None) -> Report:
        self.setup()
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline and (max_schedules is None or n < max_schedules):
            self.schedule(n, deadline)
            n += 1
            self.report.schedules = n
        self.report.faults = self._faults_hit()
        return self.report

    def schedule(self, number: int, deadline: float) -> None:
        """A fresh store, a random number of random steps, then a finish (every build resumed to its
        end, without faults or kills) and gc, with every invariant checked along the way."""
        self.number = number
        # A third of the schedules store a hybrid model (its states too), drawn from a generator of
        # their own: the steps of a seed's plain schedules stay what they were.
        self.kind = "hybrid" if self.kind_rng.random() < HYBRID_SHARE else "plain"
        self.model = self.models[self.kind]
        self._ran(f"{self.kind} schedule")
        self._references(self.kind)
        self.pruned = False  # a prune (even a killed one) may remove any build's blocks
        self.world = 2
        full_disk = self.rng.random() < 0.25 and number > 0
        if self.cover and number == 0:  # on a roomy tmpfs, squeezed full for one step (see step)
            store = self._tmpfs_store(number, size="64m")
        else:
            store = self._tmpfs_store(number) if full_disk else self.work / f"store-{number}"
        if store is None:
            store = self.work / f"store-{number}"
        shutil.rmtree(store, ignore_errors=True)
        self.store = store
        self.data_now = dict(self.data)
        self.current_a = "a"
        self.pre_growth: set[str] = set()
        self.log(f"schedule {number}: {store} ({self.kind} model)")
        steps, i = self.rng.randint(2, 4), 0
        while i < steps or (self.cover and i < COVER_MAX_STEPS and not self._covered()):  # --cover: until everything ran
            if time.monotonic() > deadline:
                break
            self.step(f"step {i}")
            i += 1
        if self.tmpfs is not None and str(store).startswith(str(self.tmpfs)):
            subprocess.run(["mount", "-o", "remount,size=64m", str(self.tmpfs)], check=False)
        self.finish()
        if self.tmpfs is not None:
            shutil.rmtree(store, ignore_errors=True)

    def _tmpfs_store(self, number: int, size: str | None = None) -> Path | None:
        """A store on a tmpfs of a few MiB, or ``size`` (root only; else the schedule runs on the work folder)."""
        if self.tmpfs is None:
            point = self.work / "tmpfs"
            point.mkdir(exist_ok=True)
            if (
                os.geteuid() != 0
                or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(point)], capture_output=True).returncode
            ):
                self.report.skipped.append("cannot mount a tmpfs (not root, or no mount permission): no full-disk schedules")
                return None
            self.tmpfs = point
        size = size or f"{self.rng.choice([2, 3, 4])}m"
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.tmpfs)], check=False)
        return self.tmpfs / f"store-{number}"

    def close(self) -> None:
        if self.tmpfs is not None:
            subprocess.run(["umount", "-l", str(self.tmpfs)], check=False)
            self.tmpfs = None

    def step(self, name: str) -> None:
        """Start a random mix of processes at once, kill some, wait for the rest, check."""
        self.report.steps += 1
        rng, store = self.rng, self.store
        exists = (store / "manifest.json").exists()
        delay = rng.choice([0, 5_000, 20_000, 100_000, 300_000])
        rates = {"TORTURE_DELAY_US": delay}
        if rng.random() < 0.4 or (self.cover and not self._faults_hit()):  # per write or fsync under the store
            rates.update(
                TORTURE_EIO=rng.choice([2_000, 20_000]),
                TORTURE_ENOSPC=rng.choice([0, 5_000]),
                TORTURE_SHORT=rng.choice([0, 100_000]),
            )
            self._ran("faults")
        faulty = lambda: rng.random() < 0.6  # noqa: E731  (some processes of a step without faults)
        planned: list[Planned] = []

        def kill(p: float) -> float | None:  # seconds after it took its lock, or None
            return rng.uniform(0.0, 2.5) if rng.random() < p else None

        stop = self.work / f"stop-{self.number}-{name.replace(' ', '')}"
        stop.unlink(missing_ok=True)
        shard = lambda: rng.choice(SMALL_SHARDS)  # noqa: E731
        kinds = ["build", "build", "ranks", "ranks", "cleaners", "grow", "ranks-other-world"] + (["maint"] * 2 if exists else [])
        if self.mix:
            kinds = [k for k in kinds if k in self.mix] or ["build"]
        chosen = rng.sample(kinds, rng.randint(1, min(3, len(kinds))))
        if self.cover:  # what has not run yet first (a schedule's first step has no store: no maint yet)
            new = [k for k in dict.fromkeys(kinds) if not self.report.ran.get(k)]
            chosen = list(dict.fromkeys(rng.sample(new, min(2, len(new))) + chosen))[:3]
        if not exists and not any(k.startswith("build") or k.startswith("ranks") for k in chosen):
            chosen.append("build")
        if "ranks-other-world" in chosen and "ranks" not in chosen:
            chosen.insert(0, "ranks")  # a resume of another world size beside ranks that run
        if "cleaners" in chosen and "build" not in chosen:
            chosen.append("build")  # cleaners race the lock of a writer that starts
        if self.cover and not self.report.kills and "build" not in chosen:
            chosen.append("build")  # the forced kill's writer (see _force)
        self.log(f"  {name}: {', '.join(chosen)}; delays up to {delay} us, faults {rates}")
        for kind in chosen:
            self._ran(kind)
        # --cover, on a tmpfs, once compaction ran: this step meets a full disk (16 KiB left: a few files).
        squeeze = (
            self.cover and self._on_tmpfs() and exists and self.report.ran.get("compact") and not self.report.ran.get("full-disk")
        )
        if squeeze:
            st = os.statvfs(self.tmpfs)
            used = (st.f_blocks - st.f_bfree) * st.f_frsize // 1024
            subprocess.run(["mount", "-o", f"remount,size={used + 16}k", str(self.tmpfs)], check=False)
            self._ran("full-disk")
            self.log(f"  {name}: the tmpfs squeezed to {used + 16} KiB (16 KiB free)")
        for kind in chosen:
            if kind == "grow" and self.current_a == "a" and self._all_complete():
                self.current_a = "a+"  # the dataset file grows: a rerun must store the new records
                self.pre_growth = {b.build_id for b in self._builds()}
                shutil.copy(self.data["a+"], self.work / f"a-live-{self.number}.jsonl")
            data_name = rng.choice([self.current_a, "b"])
            data = self._dataset_file(data_name)
            if kind == "build":
                mode = rng.choice(["--append", "--resume"] if exists else ["--append", ""])
                args = _build_args(self.model, data, store, "--shard-bytes", shard(), *([mode] if mode else []))
                if rng.random() < 0.3:
                    args.append("--no-fsync")
                planned.append(Planned("build", self._cli(*args), "build", faulty(), rates, kill(0.4), data_name))
            elif kind in ("ranks", "ranks-other-world"):
                world = self.world if kind == "ranks" else rng.choice([w for w in (1, 2, 3) if w != self.world])
                resume = ["--resume"] if (exists and rng.random() < 0.6) or kind == "ranks-other-world" else []
                later = rng.uniform(2, 6) if kind == "ranks-other-world" else 0  # once the others run
                for r in range(world):
                    args = _build_args(self.model, data, store, "--shard-bytes", shard(), *resume)
                    args += ["--rank", r, "--world-size", world]
                    cmd = _after(later, self._cli(*args))
                    planned.append(Planned(f"rank {r}/{world}", cmd, "ranks", faulty(), rates, kill(0.3), data_name))
                if kind == "ranks":
                    self.world = world
            elif kind == "maint":
                jobs = rng.sample(["compact", "prune", "gc", "verify"], rng.randint(1, 3))
                if self.cover:
                    jobs = list(dict.fromkeys([j for j in ("compact", "prune", "gc") if not self.report.ran.get(j)] + jobs))
                for job in jobs:
                    self._ran(job)
                    args = {"compact": ["compact", store], "prune": ["prune", store, "--min-records", "2", "--quiet"],
                            "gc": ["gc", store], "verify": ["verify", store, "--quick"]}[job]  # fmt: skip
                    if job == "prune":
                        self.pruned = True
                    role = "verify" if job == "verify" else "maint"
                    faults = faulty() and role != "verify"
                    planned.append(Planned(job, self._cli(*args), role, faults, rates, kill(0.3) if role != "verify" else None))
            elif kind == "cleaners":
                code = "import sys,time\nfrom prefixgen.maintain.gc import collect_garbage\nfrom prefixgen.errors import PrefixgenError\nend=time.time()+float(sys.argv[2])\nwhile time.time()<end:\n    try: collect_garbage(sys.argv[1])\n    except PrefixgenError as e: print('error:', e, file=sys.stderr); time.sleep(0.2)\n"
                for i in range(3):
                    cmd = [sys.executable, "-c", code, store, "12"]
                    planned.append(Planned(f"cleaner {i}", cmd, "cleaner", True, {"TORTURE_DELAY_US": max(delay, 100_000)}, None))
        planned.append(
            Planned("reader", [sys.executable, HERE / "reader.py", store, self.prompts, stop], "reader", False, {}, None)
        )
        self._ran("reader")
        if self.cover:
            self._force(planned, delay)
        children = [
            self._start(p.name, p.cmd, p.role, self._env(p.faults, store, p.rates), p.kill_after, p.dataset, p.hold)
            for p in planned
        ]
        serve = None
        if exists and rng.random() < 0.15:
            serve = self._serve(store)
            if serve is not None:
                children.append(serve)
        self._watch(children, stop, name)
        if squeeze:
            subprocess.run(["mount", "-o", "remount,size=64m", str(self.tmpfs)], check=False)
        self._check_step(children, name)

    def _force(self, planned: list[Planned], delay: int) -> None:
        """--cover: make what has not happened yet happen in this step, whatever the machine's speed,
        at a point the seed draws. A kill -9 (until one ended a process): the shim holds a writer at
        its n-th operation under the store after it took its lock, or at its lock's release if that
        comes first, until the harness, seeing the hold, kills it: alive, lock held, mid-job, however
        fast it runs or slowly the harness polls. An injected fault (until one was): the shim fails
        another writer's k-th write or fsync after its lock (the same one's, before its hold, when
        it is the only writer). A target refused before its lock meets neither: the next step forces
        again."""

        # Those sure to take their lock first: a build that appends (a --resume may find nothing to
        # do, a new build finds the store another process made, a rank rerun of a complete build is a
        # no-op: all before their lock), ranks that start at once, maintenance jobs; late ranks last.
        def rank(p: Planned) -> tuple:
            late, resumes = p.cmd[0] == "sh", "--resume" in p.cmd
            return (late, ("build", "ranks", "maint").index(p.role), p.role == "build" and "--append" not in p.cmd, resumes)

        writers = sorted((p for p in planned if p.role in ("build", "ranks", "maint")), key=rank)
        if not writers:
            return
        rng, step = self.rng, self.report.steps
        victim = None
        if not self.report.kills:
            # An --append build (step() adds one if the step has none): it always takes its lock.
            victim = next((p for p in planned if p.role == "build"), writers[0])
            if victim.role == "build" and "--append" not in victim.cmd:
                victim.cmd = [c for c in victim.cmd if c != "--resume"] + ["--append"]
            self._ran("forced kill")
            if self.shim is None:  # no shim to hold it: killed as soon as its lock is seen
                victim.kill_after = 0.0
            else:
                victim.kill_after, victim.faults = None, True
                victim.hold = self.work / "logs" / f"hold-{self.number}-{step}"
                victim.hold.unlink(missing_ok=True)
                victim.rates = {
                    "TORTURE_DELAY_US": delay,
                    "TORTURE_HOLD": rng.randint(2, HOLD_OPS),
                    "TORTURE_HOLD_FILE": victim.hold,
                }
        if not self._faults_hit() and self.shim is not None:
            target = next((p for p in writers if p is not victim and p.cmd[0] != "sh"), victim or writers[0])
            fail_at = rng.randint(1, FAIL_OPS)
            if target is victim:  # its fault first, its kill after
                fail_at = min(fail_at, int(victim.rates["TORTURE_HOLD"]) - 1)
            target.faults, target.rates = True, {**target.rates, "TORTURE_FAIL_AT": fail_at}
            self._ran("forced fault")
            self.log(f"  forced: an EIO at {target.name}'s write or fsync {fail_at} after its lock")
        if victim is not None:
            self.log(f"  forced: kill -9 of {victim.name} at its operation {victim.rates.get('TORTURE_HOLD')} after its lock")

    COVER = ("build", "ranks", "ranks-other-world", "cleaners", "maint", "compact", "prune", "gc", "faults")

    def _covered(self) -> bool:
        """Whether every kind of step, maintenance job and injected fault has run, and a kill -9 (and
        a full disk, where a tmpfs could be mounted)."""
        return not self._missing()

    def _missing(self) -> list[str]:
        """What ``--cover`` has not met yet (see :meth:`_covered`)."""
        missing = [k for k in self.COVER if not self.report.ran.get(k)]
        missing += ["kill -9"] * (not self.report.kills) + ["an injected fault"] * (not self._faults_hit())
        return missing + ["full disk"] * (self._on_tmpfs() and not self.report.ran.get("full-disk"))

    def _faults_hit(self) -> int:
        """Faults the shim injected so far (a step drawn with fault rates may happen to inject none)."""
        return len(self.fault_log.read_text().splitlines()) if self.fault_log.exists() else 0

    def _on_tmpfs(self) -> bool:
        return self.tmpfs is not None and str(self.store).startswith(str(self.tmpfs))

    def _ran(self, kind: str) -> None:
        self.report.ran[kind] = self.report.ran.get(kind, 0) + 1

    def _builds(self) -> list:
        from prefixgen.store.reader import read_builds

        return read_builds(self.store) if (self.store / "manifest.json").exists() else []

    def _all_complete(self) -> bool:
        return all(b.status == "complete" for b in self._builds())

    def _dataset_file(self, name: str) -> Path:
        if name in ("a", "a+"):
            live = self.work / f"a-live-{self.number}.jsonl"
            if not live.exists():
                shutil.copy(self.data[name], live)
            return live
        return self.data[name]

    def _serve(self, store: Path) -> Child | None:
        port = 20000 + self.rng.randrange(20000)
        cmd = self._cli("serve", store, "-m", self.model, "--port", port, "--device", "cpu")
        child = self._start("serve", cmd, "serve", self._env(False), None)
        child.port = port  # type: ignore[attr-defined]
        return child

    # ------------------------------------------------------------------ watching

    def _watch(self, children: list[Child], stop: Path, step: str) -> None:
        """Poll until the workers end: kill -9 on schedule, watch for deleted live locks, drive serve."""
        workers = [c for c in children if c.role not in ("reader", "serve", "cleaner")]
        deleted: dict[tuple[int, str], list[float]] = {}
        serve = next((c for c in children if c.role == "serve"), None)
        serve_errors: list[str] = []
        serve_thread = None
        if serve is not None:
            serve_thread = threading.Thread(target=self._drive_serve, args=(serve, stop, serve_errors), daemon=True)
            serve_thread.start()
        scheduled: set[int] = set()  # pids sent their kill -9 on schedule (not for a hang)
        limit = time.monotonic() + 240
        while time.monotonic() < limit:
            now = time.monotonic()
            for c in children:
                if c.proc.poll() is not None:
                    continue
                if c.locked_at is None and self._holds_lock(c.proc.pid):
                    c.locked_at = now
                due = c.kill_after is not None and c.locked_at is not None and now - c.locked_at >= c.kill_after
                held = c.hold is not None and c.hold.exists()
                if (due or held) and not c.killed:  # (a killed one may take a poll or two to end)
                    if held:
                        self.log(f"  {step}: kill -9 {c.name}, held at {' '.join(c.hold.read_text().split()[1:])}")
                    os.killpg(c.proc.pid, signal.SIGKILL)
                    c.killed = True
                    scheduled.add(c.proc.pid)
                for target in self._deleted_locks(c.proc.pid):
                    deleted.setdefault((c.proc.pid, target), []).append(now)
            if all(c.proc.poll() is not None for c in workers) and all(
                c.proc.poll() is not None for c in children if c.role == "cleaner"
            ):
                break
            time.sleep(0.05)
        stop.touch()
        if serve_thread is not None:
            serve_thread.join(timeout=60)
        for c in children:
            if c.role == "serve" and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGINT)
            try:
                c.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(c.proc.pid, signal.SIGKILL)
                c.killed = True
                c.proc.wait()
                if c.role != "serve":
                    self._violate(step, "hang", f"{c.name} ({' '.join(c.cmd[2:])}) still ran after 240 s")
            c.out, c.err = (p.read_text(errors="replace") for p in c.files)  # type: ignore[attr-defined]
        for c in children:
            # A kill sent just after the process ended on its own (its status not read yet) is no
            # kill -9: it is checked as a process that ended, and --cover forces another.
            c.killed = c.killed and c.proc.returncode == -signal.SIGKILL
            self.report.kills += c.killed and c.proc.pid in scheduled
        for (pid, target), seen in deleted.items():
            if len(seen) >= 3 and seen[-1] - seen[0] >= 0.5:
                self._violate(
                    step, "live lock deleted", f"process {pid} still held {target} (unlinked) for {seen[-1] - seen[0]:.1f} s"
                )
        for e in serve_errors:
            self._violate(step, "serve error", e)

    def _holds_lock(self, pid: int) -> bool:
        folder = self.store / "locks"
        try:
            return any(p.read_text().startswith(f"pid {pid} ") for p in folder.glob("*.lock"))
        except OSError:
            return False

    def _deleted_locks(self, pid: int) -> list[str]:
        out = []
        fds = Path(f"/proc/{pid}/fd")
        try:
            for fd in fds.iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.endswith(".lock (deleted)") and target.startswith(str(self.store / "locks")):
                    out.append(target)
        except OSError:
            pass
        return out

    def _drive_serve(self, serve: Child, stop: Path, errors: list[str]) -> None:
        url = f"http://127.0.0.1:{serve.port}"  # type: ignore[attr-defined]
        up = time.monotonic() + 90
        while time.monotonic() < up and serve.proc.poll() is None and not stop.exists():
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        while not stop.exists() and serve.proc.poll() is None:
            body = json.dumps({"prompt": self.rng.choice(self.texts), "max_tokens": 1}).encode()
            req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=30).read()
            except urllib.error.HTTPError as exc:
                if exc.code >= 500:
                    errors.append(f"HTTP {exc.code}: {exc.read()[:300]!r}")
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)

    # ------------------------------------------------------------------ invariants

    def _violate(self, step: str, kind: str, detail: str) -> None:
        v = Violation(self.number, step, kind, detail)
        self.report.violations.append(v)
        self.log(f"VIOLATION {v}")

    def _check_step(self, children: list[Child], step: str) -> None:
        for c in children:
            self._check_output(c, step)
        self._check_exit_0(children, step)
        self._check_ended(children, step)
        self._check_store(step)

    def _check_output(self, c: Child, step: str) -> None:
        if c.role == "reader":
            for line in c.out.splitlines():
                if line.startswith("ERROR"):
                    self._violate(step, "reader error", line[:400])
            return
        if c.killed or c.proc.returncode == 0 or c.role == "serve":
            return
        if c.role == "verify" and c.proc.returncode == 1 and "Traceback" not in c.err:
            self._violate(step, "verify failed beside other processes", _tail(c.out + c.err))
            return
        errors = [line for line in c.err.splitlines() if line.startswith("error:")]
        if "Traceback" in c.err or "Aborted!" in c.err or len(errors) != 1:
            self._violate(
                step, "not one clear line", f"{c.name} ({' '.join(c.cmd[2:])}) exit {c.proc.returncode}: {_tail(c.err)}"
            )
        if any(w in c.err for w in ("No space left", "full", "Input/output error")):
            self.report.full_disks += "full" in c.err

    def _check_ended(self, children: list[Child], step: str) -> None:
        """A process that ended on its own (not killed) left no temporary file and no record running."""
        killed = {c.proc.pid for c in children if c.killed}
        alive_owner = lambda name: any(f"-{pid}-" in name for pid in killed)  # noqa: E731
        for p in self.store.rglob("*.tmp") if self.store.exists() else []:
            m = re.search(r"(\d{8}T\d{6})-(\d+)-", p.name)
            if m and int(m.group(2)) in {c.proc.pid for c in children} and not alive_owner(p.name):
                self._violate(step, "temporary file left", f"{p.relative_to(self.store)} by a process that ended on its own")
        ended = {c.proc.pid for c in children if not c.killed and c.role in ("build", "ranks")}
        for p in (self.store / "builds").glob("**/*.json") if self.store.exists() else []:
            try:
                rec = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            pids = {int(m.group(1)) for w in rec.get("writers", []) for m in [re.match(r"\d{8}T\d{6}-(\d+)-", w)] if m}
            if rec.get("status") == "running" and pids and pids <= ended:
                self._violate(step, "record left running", f"{p.relative_to(self.store)}: its writers ended on their own")

    def _check_exit_0(self, children: list[Child], step: str) -> None:
        """A build command (every rank of it) that exited 0, without --resume, stored every block of
        its dataset as it was when it started (unless a prune may have removed some since)."""
        from prefixgen.store.reader import PrefixStore

        runs: dict[tuple, list[Child]] = {}
        for c in children:
            if c.role in ("build", "ranks") and "--resume" not in c.cmd:
                runs.setdefault(
                    (c.role, c.dataset, c.cmd[c.cmd.index("--world-size") + 1] if "--world-size" in c.cmd else "1"), []
                ).append(c)
        for (role, name, _), procs in runs.items():
            if self.pruned or name is None or any(c.killed or c.proc.returncode for c in procs):
                continue
            if role == "ranks" and len({c.cmd[c.cmd.index("--rank") + 1] for c in procs}) < int(
                procs[0].cmd[procs[0].cmd.index("--world-size") + 1]
            ):
                continue
            try:
                found = PrefixStore.open(self.store).index.find(self.ref_keys[self.kind][name])
            except Exception as exc:
                self._violate(step, "store unreadable", str(exc)[:300])
                continue
            missing = sum(loc is None for loc in found)
            if missing:
                self._violate(
                    step,
                    "build exited 0 without storing its dataset",
                    f"{procs[0].name} of {name}: {missing} of {len(found)} blocks are not stored",
                )

    def _check_store(self, step: str, final: bool = False) -> None:
        from prefixgen.errors import PrefixgenError
        from prefixgen.maintain.verify import verify_store

        if not (self.store / "manifest.json").exists():
            return
        report = verify_store(self.store)
        if not report.ok:
            self._violate(step, "verify fails", "; ".join(report.faults)[:600])
            return
        try:
            self._check_builds(step, final)
        except PrefixgenError as exc:
            self._violate(step, "store unreadable", str(exc)[:400])

    def _check_builds(self, step: str, final: bool) -> None:
        import torch

        from prefixgen.store.reader import PrefixStore, read_builds

        store = PrefixStore.open(self.store)
        records = {"a": 24, "a+": 36, "b": 20}
        for b in read_builds(self.store):
            name = (
                "a" if b.build_id in self.pre_growth and self._dataset_name(b.dataset) == "a+" else self._dataset_name(b.dataset)
            )
            if b.status == "complete" and name and b.records > records[name]:
                self._violate(
                    step, "records counted twice", f"build {b.build_id}: {b.records} records of a {records[name]}-record dataset"
                )
            if final and b.status != "complete":
                self._violate(step, "build never completes", f"build {b.build_id} is {b.status} after every rank was resumed")
            if b.status != "complete" or self.pruned or not name or b.selection:
                continue
            keys = self.ref_keys[self.kind][name]
            found = store.index.find(keys)
            missing = sum(loc is None for loc in found)
            if missing:
                self._violate(
                    step,
                    "complete build's blocks missing",
                    f"build {b.build_id} of {name}: {missing} of {len(keys)} blocks are not stored",
                )
                continue
            got = store.read_blocks(keys)
            want = PrefixStore.open(self.refs[self.kind][name]).read_blocks(keys)
            err = (got.float() - want.float()).abs().max().item()
            if err > TOLERANCE * max(1.0, want.abs().max().item()) or torch.isnan(got).any():
                self._violate(step, "wrong KV", f"build {b.build_id} of {name}: max error {err:.3g} against the reference")

    def _dataset_name(self, path: str) -> str | None:
        for name, p in self.data.items():
            if Path(path).name == p.name:
                return name
        if Path(path).name.startswith("a-live-"):
            return self.current_a  # its content when checked (a build of the older content is rerun as a+)
        return None

    def finish(self) -> None:
        """Resume every unfinished build to its end (no faults, no kills), gc, and check that nothing
        is left behind."""
        from prefixgen.store.reader import read_builds

        if not (self.store / "manifest.json").exists():
            return
        for _ in range(4):
            children = []
            for b in read_builds(self.store):
                if b.status == "complete":
                    continue
                data = b.dataset
                if b.world_size > 1:
                    world = b.world_size
                    for r in range(world):
                        args = _build_args(self.model, data, self.store, "--resume", "--rank", r, "--world-size", world)
                        children.append(
                            self._start(f"finish rank {r}/{world}", self._cli(*args), "ranks", self._env(False), None)
                        )
                else:
                    args = _build_args(self.model, data, self.store, "--resume")
                    children.append(self._start("finish build", self._cli(*args), "build", self._env(False), None))
                break  # one build at a time: the resumes of two builds are two steps
            if not children:
                break
            stop = self.work / f"stop-{self.number}-finish"
            self._watch(children, stop, "finish")
            for c in children:
                self._check_output(c, "finish")
        gc = subprocess.run(self._cli("gc", self.store), env=self._env(False), capture_output=True, text=True, cwd=self.code)
        if gc.returncode:
            self._violate("finish", "gc fails", _tail(gc.stderr))
        self._check_store("finish", final=True)
        self._check_clean("finish")

    def _check_clean(self, step: str) -> None:
        """After gc with nothing running: no temporary, orphaned or abandoned file."""
        from prefixgen.store.reader import PrefixStore, read_builds

        left = []
        for p in self.store.rglob("*"):
            rel = str(p.relative_to(self.store))
            if p.name.endswith(".tmp") or ".takeover-" in p.name or p.name.startswith(".clock-") or p.name.startswith(".gc-"):
                left.append(rel)
            elif rel.startswith("locks/") and p.name.endswith(".lock"):
                left.append(rel)
        complete = {b.build_id for b in read_builds(self.store) if b.status == "complete"}
        for sub in ("builds", "claims"):
            for p in (self.store / sub).iterdir() if (self.store / sub).is_dir() else []:
                if p.is_dir() and p.name.split(".")[0] in complete and not p.name.endswith(".ranks"):
                    left.append(str(p.relative_to(self.store)) + "/")
        try:
            index = PrefixStore.open(self.store).index
            named = {r.name for s in index.segments for r in s.shards}
            left += [f"shards/{p.name}" for p in (self.store / "shards").glob("*.safetensors") if p.name not in named]
            # A hybrid's recurrent states: each of a block the index holds (gc removes the others).
            states = sorted((self.store / "states").glob("*.safetensors"))
            held = index.contains([bytes.fromhex(p.name.split(".")[0]) for p in states])
            left += [f"states/{p.name}" for p, h in zip(states, held) if not h]
        except Exception as exc:  # reported by verify already
            self.log(f"index unreadable in the clean check: {exc}")
        if left:
            self._violate(step, "left after gc", ", ".join(sorted(left)[:8]) + (f" (+{len(left) - 8})" if len(left) > 8 else ""))


def _after(seconds: float, cmd: list) -> list:
    """``cmd`` started ``seconds`` later (by a shell that then becomes it)."""
    if not seconds:
        return cmd
    return ["sh", "-c", f'sleep {seconds:.2f}; exec "$0" "$@"', *map(str, cmd)]


def _build_args(model: Path, data: object, store: object, *more: object) -> list[object]:
    """``prefixgen build`` of ``data`` into ``store`` with ``model`` (the schedule's), quiet, then ``more``."""
    return ["build", data, "-m", model, "--out", store, "--quiet", *more]


def _hybrid_model(path: Path) -> Path:
    """A tiny Qwen3-Next (Gated DeltaNet layers beside attention, tests/kinds.py) with the stories
    tokenizer: its stores keep recurrent states (``states/``) beside the KV."""
    if not (path / "config.json").exists():
        from tests.conftest import make_model
        from tests.kinds import QWEN3_NEXT

        make_model(path, "qwen3_next", seed=1, initializer_range=0.1, **QWEN3_NEXT)
    return path


def _tail(text: str, n: int = 600) -> str:
    return " | ".join(line for line in text.strip().splitlines()[-6:])[-n:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--schedules", type=int, default=None, help="Stop after this many schedules.")
    ap.add_argument(
        "--cover", action="store_true", help="Draw first the step kinds, jobs and faults not run yet (as CI's slice)."
    )
    ap.add_argument("--work", type=Path, default=None, help="Work folder (default: a fresh one in /tmp).")
    ap.add_argument("--code", type=Path, default=REPO, help="The prefixgen checkout the children run.")
    ap.add_argument(
        "--mix",
        default="",
        help="Comma-separated step kinds to draw from (default: all): build, ranks, ranks-other-world, maint, cleaners, grow.",
    )
    args = ap.parse_args()
    work = args.work or Path(f"/tmp/prefixgen-torture-{args.seed}-{os.getpid()}")
    torture = Torture(work, args.seed, args.code.resolve(), mix=tuple(filter(None, args.mix.split(","))), cover=args.cover)
    try:
        report = torture.run(args.minutes * 60, args.schedules)
    finally:
        torture.close()
    print(report.summary())
    missing = args.cover and torture._missing()
    if missing:  # over the whole run (a schedule draws first what the run has not met)
        print(f"  --cover: not met: {', '.join(missing)}")
    sys.exit(1 if report.violations or missing else 0)


if __name__ == "__main__":
    main()
