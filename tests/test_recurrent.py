"""Hybrid models with recurrent layers (Gated DeltaNet in Qwen3-Next, Mamba2 in Granite 4.0) built into a
store by the real build: the attention layers' KV per block, the recurrent states at stride boundaries and
where tasks end, each exactly what a forward of that prefix computes; loaded back, the model's own cache
continues as a full recompute, through ``PrefixStore.load`` and ``prefixgen serve``."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefixgen import BuildConfig, PrefixStore, build
from prefixgen.builder.recurrent import stride_blocks
from prefixgen.cache_spec import RECURRENT, cache_spec
from prefixgen.compat import cache_kwargs, model_cache, output_cache
from prefixgen.kvcache import states_from_cache
from prefixgen.maintain.verify import verify_store
from prefixgen.model import config_kv_layout
from prefixgen.store.states import STATES_DIR, read_state, read_state_file, state_path

from .conftest import CHAT_TEMPLATE, make_model, write_jsonl
from .kinds import HYBRIDS, build_text_store, load_float32, serve_answers, tiny_kind

# Each longer than two state strides (32 tokens, 2 blocks of 16, for both configs below).
PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside with her friends in the sun. "
    "One day she found a shiny stone by the river and showed it to her mother.",
    "Once upon a time, there was a little boy named Tom. He had a big red ball and a small dog called Max. "
    "They played in the park every morning until the sun went down.",
]
SUFFIX = " And then they all went home happy, singing a song."


@pytest.fixture(scope="module", params=list(HYBRIDS))
def hybrid(request, tmp_path_factory):
    return tiny_kind(request, tmp_path_factory, HYBRIDS)


@pytest.fixture(scope="module")
def hybrid_store(hybrid, tmp_path_factory):
    arch, model_dir = hybrid
    return build_text_store(model_dir, PROMPTS, tmp_path_factory.mktemp(f"store-{arch}"))


def test_stride_and_layout(hybrid, hybrid_store):
    arch, model_dir = hybrid
    manifest = json.loads((hybrid_store.path / "manifest.json").read_text())
    spec = cache_spec(AutoConfig_of(model_dir))
    (rec,) = [g for g in manifest["kv"]["groups"] if g["kind"] == RECURRENT]
    assert rec["state_stride"] == 32 and stride_blocks(hybrid_store.manifest.kv, 16) == 2
    assert manifest["kv"]["num_layers"] == len(spec.attention_layers) < spec.num_layers
    # the block order is the build's choice (head-major by default), not the config's
    assert dataclasses.replace(config_kv_layout(AutoConfig_of(model_dir), "float32"), order="heads") == hybrid_store.manifest.kv
    assert verify_store(hybrid_store.path).ok


def AutoConfig_of(model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


@torch.inference_mode()
def test_stored_states_are_the_forward_of_the_prefix(hybrid, hybrid_store):
    """At every stride boundary and at each record's last block, the stored state is what a forward of
    that prefix alone computes: bitwise at the first boundary (the build's first segment is that very
    forward), within float32 rounding later (the build continues its cache, as chunked prefill does)."""
    arch, model_dir = hybrid
    model, tok = load_float32(model_dir)
    bs = hybrid_store.block_size
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        keys = hybrid_store.keys(ids)
        # The stride (2 blocks), and where the record ends as a prompt ((n - 1) // B) and as a prefix (n // B).
        want = sorted({b for b in range(1, len(keys) + 1) if b % 2 == 0} | {len(keys), (len(ids) - 1) // bs})
        held = [b for b in range(1, len(keys) + 1) if state_path(hybrid_store.path, keys[b - 1]).exists()]
        assert held == want, (held, want)
        for b in want:
            cache = output_cache(
                model(torch.tensor([ids[: b * bs]]), use_cache=True, **cache_kwargs(model, model_cache(model.config)))
            )
            conv, ssm = states_from_cache(cache, hybrid_store.manifest.kv)
            s_conv, s_ssm = read_state(hybrid_store.path, keys[b - 1], b * bs)
            if b == want[0]:
                assert torch.equal(s_conv, conv[0]) and torch.equal(s_ssm, ssm[0])
            bound = 1e-5  # float32 rounding of values of order 1 (the states here are below 1)
            assert (s_conv - conv[0]).abs().max().item() < bound and (s_ssm - ssm[0]).abs().max().item() < bound


@torch.inference_mode()
def test_loaded_cache_continues_as_a_full_recompute(hybrid, hybrid_store):
    arch, model_dir = hybrid
    model, tok = load_float32(model_dir)
    hybrid_store.check_compatible(model, tok)
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids + tok(SUFFIX).input_ids
        cache = hybrid_store.load(ids)
        n = int(cache.get_seq_length())
        assert n > 32 and n % hybrid_store.block_size == 0  # past one stride
        full = model(torch.tensor([ids])).logits[0, n:]
        rest = model(torch.tensor([ids[n:]]), **cache_kwargs(model, cache)).logits[0]
        bound = 1e-4 * full.abs().max().item()  # float32 rounding through the chunked scans
        assert (rest - full).abs().max().item() < bound, arch
    # Greedy generation from the loaded cache equals generation from the whole prompt.
    plain = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    cached = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, **cache_kwargs(model, hybrid_store.load(ids)))
    assert plain.tolist() == cached.tolist(), arch


def test_prefixgen_serve_answers_as_without_the_store(hybrid, hybrid_store):
    """``prefixgen serve``'s engine: greedy answers with the stored prefix and state loaded equal those of --no-store."""
    _, model_dir = hybrid
    a, b = serve_answers(model_dir, hybrid_store, PROMPTS[1] + SUFFIX, 8)
    assert a.cached_tokens > 32 and b.cached_tokens == 0
    assert a.tokens == b.tokens


def test_a_damaged_state_is_refused(hybrid, hybrid_store, tmp_path):
    """A state file whose bytes changed fails its checksum: the load says which file, serve goes on without it."""
    import shutil

    from prefixgen.errors import CorruptStoreError

    _, model_dir = hybrid
    copy = tmp_path / "store"
    shutil.copytree(hybrid_store.path, copy)
    store = PrefixStore.open(copy)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(PROMPTS[0]).input_ids + tok(SUFFIX).input_ids
    n = int(store.load(ids).get_seq_length())
    path = state_path(copy, store.keys(ids)[n // store.block_size - 1])
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="checksum"):
        store.load(ids)
    report = verify_store(copy)  # `prefixgen verify` reads every state file too
    assert not report.ok and any(str(path) in f and "recurrent state" in f for f in report.faults), report.faults
    assert (copy / STATES_DIR).is_dir()


# Why each target without recurrent state refuses a hybrid, from the engines' code (prefixgen/export/*.py).
RECURRENT_REFUSALS = {
    "lmcache": "LMCache's in-process connector (LMCacheConnectorV1) is not SupportsHMA",
    "vllm": "a MambaSpec is not an AttentionSpec",
}


def test_exports_refuse_a_hybrid_store_with_the_reason(hybrid_store, cli, tmp_path):
    """LMCache's and vLLM's exports cannot hold recurrent state: one message naming the kind, the target and
    the engine's reason, and no export folder. SGLang's can (tests_sglang/test_sglang_cache_kinds.py), but only
    in the layouts and TP size its Mamba host pool takes: a clear message for the others."""
    for target, reason in RECURRENT_REFUSALS.items():
        out = tmp_path / target
        result = cli("export", hybrid_store.path, "--to", target, "--out", out, "--model-name", "m", "--hash-seed", "0")
        assert result.exit_code not in (0, 1), result.output
        assert "layers of recurrent state" in result.stderr and f"--to {target} cannot write recurrent state" in result.stderr
        assert reason in result.stderr, result.stderr
        assert "Traceback" not in result.output and not out.exists()
    sglang = {
        ("--layout", "layer_first"): "only with --hicache-mem-layout page_first or page_first_direct",
        ("--tp-size", "2"): "--tp-size above 1 is not supported for a hybrid model's recurrent state",
    }
    for (flag, value), message in sglang.items():
        out = tmp_path / f"sglang{value}"
        cmd = ["export", hybrid_store.path, "--to", "sglang", "--out", out, "--model-name", "m", "--kv-dtype", "float32"]
        result = cli(*cmd, flag, value)
        assert result.exit_code not in (0, 1) and message in result.stderr, result.output
        assert "Traceback" not in result.output and not out.exists()
    listing = cli("ls", hybrid_store.path)
    assert listing.exit_code == 0 and "layers of recurrent state" in listing.output, listing.output


def test_sglang_export_writes_a_state_where_a_page_ends_on_one(hybrid_store, cli, tmp_path):
    """Every page's KV file, and a ``.mamba`` state file for exactly the pages that end on a stored state (the
    stride and the records' ends), named as SGLang's HiCacheFile names them (tests_sglang reads them back)."""
    out = tmp_path / "sglang"
    result = cli("export", hybrid_store.path, "--to", "sglang", "--out", out, "--model-name", "org/m", "--kv-dtype", "float32")
    assert result.exit_code == 0, result.output
    kv = sorted(p.name for p in out.glob("*_org-m_0_1.bin") if ".mamba_" not in p.name)
    states = sorted(p.name for p in out.glob("*.mamba_org-m_0_1.bin"))
    stored = len(list((hybrid_store.path / STATES_DIR).glob("*.safetensors")))
    assert kv and states and len(states) == stored  # page size 16 = block size: every stored state ends a page
    assert {n.split(".")[0] for n in states} <= {n.split("_")[0] for n in kv}


def _continues(store, model, ids, n):
    """``load`` of ``ids[:-1]`` covers ``n`` tokens and continues as a full forward."""
    cache = store.load(ids[:-1])
    assert int(cache.get_seq_length()) == n
    full = model(torch.tensor([ids])).logits[0, n:]
    rest = model(torch.tensor([ids[n:]]), **cache_kwargs(model, cache)).logits[0]
    assert (rest - full).abs().max().item() < 1e-4 * full.abs().max().item()


@torch.inference_mode()
def test_a_state_where_each_turn_ends(tmp_path):
    """A chat's earlier turns end as a server's prompt inside the record (blocks 5 and 11 here, off the
    stride of 2 blocks): ``load`` of those prompts covers every block before their last token."""
    model_dir = make_model(
        tmp_path / "m", "qwen3_next", seed=1, initializer_range=0.1, chat_template=CHAT_TEMPLATE, **HYBRIDS["qwen3_next"]
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    first = PROMPTS[0].split(" by the river")[0]
    turns = [first, "What did she find by the river?", "She found a shiny stone by the river, and it was very pretty.", "Thanks!"]
    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": turns}])
    cfg = BuildConfig(
        dataset=str(data), model=str(model_dir), out=str(tmp_path / "s"), device="cpu", dtype="float32",
        messages_field="messages", quiet=True,
    )  # fmt: skip
    build(cfg)
    store = PrefixStore.open(tmp_path / "s")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    bs = store.block_size
    for k in (1, 3):  # the prompts before the first and the second assistant turn
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(turns[:k])]
        ids = tok(
            tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False
        ).input_ids
        n = (len(ids) - 1) // bs * bs
        assert n % 32, "the turn's end must not fall on the stride, or this test shows nothing"
        _continues(store, model, ids, n)


@torch.inference_mode()
def test_a_state_where_a_record_built_after_a_longer_one_ends(hybrid, tmp_path):
    """The second record is a prefix of the first: all its blocks are stored before it is planned, and
    its end (block 3, off the stride) still gets a state."""
    arch, model_dir = hybrid
    model, tok = load_float32(model_dir)
    short = PROMPTS[0].split(" She loved")[0] + " She loved to play"
    ids = tok(short).input_ids
    bs = 16
    assert tok(PROMPTS[0]).input_ids[: len(ids)] == ids and ((len(ids) - 1) // bs) % 2, len(ids)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": PROMPTS[0]}, {"text": short}])
    build(
        BuildConfig(dataset=str(data), model=str(model_dir), out=str(tmp_path / "s"), device="cpu", dtype="float32", quiet=True)
    )
    _continues(PrefixStore.open(tmp_path / "s"), model, ids, (len(ids) - 1) // bs * bs)


@pytest.mark.slow
@torch.inference_mode()
def test_a_distributed_hybrid_build_stores_what_one_process_stores(tmp_path, cli):
    """Chats that share a system prompt, built by one process and by two ``--rank`` processes: the same
    blocks, the same KV and the same states (where the stride, the records and their chat turns end: not
    where the ranks' head runs or chunks happen to end), within float32 rounding."""
    from .test_distributed import CPU, assert_same_kv, finish, rank_process

    model_dir = make_model(
        tmp_path / "m", "qwen3_next", seed=1, initializer_range=0.1, chat_template=CHAT_TEMPLATE, **HYBRIDS["qwen3_next"]
    )
    system = PROMPTS[0].split(" She loved")[0] + ". "
    words = PROMPTS[1].split()
    chats = [
        [system + " ".join(words[i : i + 6 + i % 5]), "She did.", " ".join(words[i + 2 : i + 12]) + "?", "Yes."] for i in range(8)
    ]
    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in chats])
    one, many = tmp_path / "one", tmp_path / "many"
    args = ["--model", model_dir, "--messages-field", "messages", "--batch-tokens", "64", *CPU]
    assert cli("build", data, "--out", one, *args).exit_code == 0
    for p in [rank_process(r, 2, "build", data, "--out", many, *args) for r in range(2)]:
        finish(p)
    assert_same_kv(one, many)
    names = sorted(p.name for p in (one / STATES_DIR).iterdir())
    assert names == sorted(p.name for p in (many / STATES_DIR).iterdir())
    for name in names:
        a, b = read_state_file(one / STATES_DIR / name), read_state_file(many / STATES_DIR / name)
        assert all((x - y).abs().max().item() < 1e-5 for x, y in zip(a, b)), name


def _state_keys(store) -> set[bytes]:
    return {bytes.fromhex(p.name.split(".")[0]) for p in (store / STATES_DIR).glob("*.safetensors")}


def test_gc_and_prune_remove_states_whose_block_is_gone(tmp_path, cli):
    """States of blocks the index does not hold (a killed build's, a pruned block's) are removed by gc and
    prune: only those older than the job's start, and none while a build holds the store."""
    import os

    from prefixgen.store.writer import WriterLock, new_id

    model_dir = make_model(tmp_path / "m", "qwen3_next", seed=1, initializer_range=0.1, **HYBRIDS["qwen3_next"])
    store = build_text_store(model_dir, PROMPTS, tmp_path).path
    kept = _state_keys(store)
    assert kept and all(PrefixStore.open(store).index.contains(list(kept)))
    first = state_path(store, next(iter(kept)))
    old, new = state_path(store, b"\x01" * 32), state_path(store, b"\x02" * 32)  # blocks no index holds
    for p in (old, new):
        p.write_bytes(first.read_bytes())
    os.utime(old, (1e9, 1e9))  # 2001: before any gc starts
    os.utime(new, (4e9, 4e9))  # 2096: after this gc's start (as a file written while it runs)
    lock = WriterLock(store, new_id(), "build")  # a live build: it may reuse any state file it finds
    result = cli("gc", store)
    assert result.exit_code == 0 and old.exists(), result.output
    lock.release()
    result = cli("gc", store)
    assert result.exit_code == 0, result.output
    assert not old.exists() and new.exists() and f"{STATES_DIR}/{old.name}" in result.output
    assert _state_keys(store) == kept | {b"\x02" * 32} and verify_store(store).ok
    new.unlink()
    # prune keeps the blocks both records hold; the states after the others go with them.
    result = cli("prune", store, "--min-records", "2")
    assert result.exit_code == 0 and "recurrent states removed" in result.output, result.output
    index = PrefixStore.open(store).index
    left = _state_keys(store)
    assert left < kept and all(index.contains(list(left))) and not any(index.contains(list(kept - left)))
    assert verify_store(store).ok and not [p for p in (store / STATES_DIR).iterdir() if p.name.startswith(".")]


@torch.inference_mode()
def test_a_batch_runs_as_its_tasks_one_at_a_time(hybrid, tmp_path):
    """Tasks of different lengths and boundaries (a stride, states asked where records end) run as one batch,
    in lockstep: the KV of their new tokens and every state they store equal those of each task run alone
    within float32 rounding (the KV within the batch-equivalence bound of a distributed build, the states
    within the bound of a state against a forward of its prefix)."""
    from prefixgen.builder.plan import Batch, PrefillTask
    from prefixgen.builder.recurrent import RecurrentPrefiller
    from prefixgen.format import block_keys
    from prefixgen.model import probe_kv_layout

    _, model_dir = hybrid
    model, tok = load_float32(model_dir)
    layout = probe_kv_layout(model)
    bs = 16
    tasks = []
    for i, text in enumerate([PROMPTS[0], PROMPTS[1], PROMPTS[0] + SUFFIX, PROMPTS[1][:90]]):
        ids = tok(text).input_ids
        n = len(ids) // bs * bs
        states = tuple(sorted({(len(ids) - 1) // bs, n // bs} - {0}))
        tasks.append(PrefillTask(i, ids[:n], 0, block_keys(ids[:n], bs, b"\0" * 32), bs, None, states))
    assert len({len(t.tokens) for t in tasks}) >= 3  # lengths differ: the tasks leave the batch at different forwards
    outputs = {}
    for name, batches in (("together", [Batch(tasks)]), ("alone", [Batch([t]) for t in tasks])):
        store = tmp_path / name
        store.mkdir()
        prefiller = RecurrentPrefiller(model, torch.device("cpu"), None, layout, store, bs, fsync=False)
        outputs[name] = [kv for b in batches for kv in prefiller.run(b)]
    for a, b in zip(outputs["together"], outputs["alone"]):  # the batch-equivalence bound of tests/test_distributed.py
        assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
    names = sorted(p.name for p in (tmp_path / "alone" / STATES_DIR).iterdir())
    assert names == sorted(p.name for p in (tmp_path / "together" / STATES_DIR).iterdir()) and len(names) > len(tasks)
    for name in names:
        a, b = (read_state_file(tmp_path / d / STATES_DIR / name) for d in ("together", "alone"))
        assert all((x - y).abs().max().item() < 1e-5 for x, y in zip(a, b)), name


@torch.inference_mode()
def test_a_held_state_survives_the_groups_that_run_before_it(hybrid, tmp_path):
    """A task that continues where an earlier batch's task ended (a chunk of a long record) starts from that
    state, held in memory only (not a stride boundary, so never written). Its batch first runs more than
    RECENT_STATES tasks from the start, whose ends would evict it: the continuation still starts from it
    (its KV equals a run of the whole prefix), and a state asked for where it ends with no new token is written."""
    from prefixgen.builder.plan import Batch, PrefillTask
    from prefixgen.builder.recurrent import RECENT_STATES, RecurrentPrefiller
    from prefixgen.format import block_keys
    from prefixgen.model import probe_kv_layout

    _, model_dir = hybrid
    model, _ = load_float32(model_dir)
    layout, bs, root = probe_kv_layout(model), 16, b"\0" * 32
    store = tmp_path / "store"
    store.mkdir()
    past_kv: dict[bytes, torch.Tensor] = {}
    prefiller = RecurrentPrefiller(
        model, torch.device("cpu"), lambda keys: past_kv[bytes(keys[-1])], layout, store, bs, fsync=False
    )
    assert prefiller.stride == 2  # block 3 below is no stride boundary: its state is held, not stored
    g = torch.Generator().manual_seed(0)
    a = torch.randint(1, 200, (3 * bs,), generator=g).tolist()
    ka = block_keys(a, bs, root)
    (past_kv[bytes(ka[-1])],) = prefiller.run(Batch([PrefillTask(0, a, 0, ka, bs, None, ())]))
    assert not state_path(store, ka[-1]).exists()
    b = a + torch.randint(1, 200, (bs,), generator=g).tolist()
    shorts = [torch.randint(1, 200, (bs,), generator=g).tolist() for _ in range(RECENT_STATES + 1)]
    tasks = [PrefillTask(10 + i, t, 0, block_keys(t, bs, root), bs, None, ()) for i, t in enumerate(shorts)]
    tasks.append(PrefillTask(1, b, 3 * bs, block_keys(b, bs, root), bs, bytes(ka[-1]), ()))
    tasks.append(PrefillTask(2, a, 3 * bs, ka, bs, bytes(ka[-1]), (3,)))  # no new token; a state asked at its end
    out = prefiller.run(Batch(tasks))
    assert out[-1].shape[0] == 0 and state_path(store, ka[-1]).exists()
    alone = RecurrentPrefiller(model, torch.device("cpu"), None, layout, tmp_path / "alone", bs, fsync=False)
    (tmp_path / "alone").mkdir()
    (whole,) = alone.run(Batch([PrefillTask(0, b, 0, block_keys(b, bs, root), bs, None, ())]))
    expect = whole[3 * bs :]  # the batch-equivalence bound of tests/test_distributed.py
    assert out[-2].shape == expect.shape and (out[-2] - expect).abs().max().item() <= 1e-5 * max(1.0, expect.abs().max().item())


def test_overwrite_removes_the_old_runs_states(hybrid, tmp_path):
    """``--overwrite`` starts an empty store, states included: a state the old run kept would be kept by the
    new one too (a build writes a state only where none is), though it holds other records (or another dtype)."""
    _, model_dir = hybrid
    store = build_text_store(model_dir, PROMPTS, tmp_path).path
    old = _state_keys(store)
    store = build_text_store(model_dir, PROMPTS[1:], tmp_path, overwrite=True).path
    new = _state_keys(store)
    assert new and old - new and all(PrefixStore.open(store).index.contains(list(new))) and verify_store(store).ok


def test_verify_beside_a_gc_removing_states(tmp_path):
    """verify lists ``states/`` and then reads each file; a gc (or prune) that removes an orphan state in
    between is no fault: the file vanished after the listing (on the code before, verify reported the store
    damaged). Real gcs on real files, repeated beside verify until they have overlapped."""
    import os
    import shutil
    import threading

    from prefixgen.maintain.gc import remove_orphan_states
    from prefixgen.store.writer import maintenance_lock

    model_dir = make_model(tmp_path / "m", "qwen3_next", seed=1, initializer_range=0.1, **HYBRIDS["qwen3_next"])
    store = build_text_store(model_dir, PROMPTS[:1], tmp_path).path
    first = next((store / STATES_DIR).iterdir())
    faults, notes, stop = [], [], threading.Event()

    def verify_loop():
        while not stop.is_set():
            report = verify_store(store)
            faults.extend(report.faults)
            notes.extend(n for n in report.notes if "removed while verify ran" in n)

    reader = threading.Thread(target=verify_loop)
    reader.start()
    try:
        for round in range(200):
            for i in range(100):  # orphans: states of blocks no index holds, older than the gc
                staged = tmp_path / "orphan"  # written whole, then renamed in (as write_state does)
                shutil.copyfile(first, staged)
                os.utime(staged, (1e9, 1e9))
                os.rename(staged, state_path(store, bytes([round, i]) * 16))
            with maintenance_lock(store, "gc") as me:
                assert len(remove_orphan_states(store, me)[0]) == 100
            if notes:  # verify met a removed file: the race was run
                break
    finally:
        stop.set()
        reader.join()
    assert not faults, faults[:3]
    assert notes
