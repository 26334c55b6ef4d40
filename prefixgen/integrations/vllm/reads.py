"""Store reads on a worker: a piece of stored blocks (this rank's heads and layers, as stored) read into a staging
buffer, with every store fault a cache miss: a block that fails its CRC or a shard that cannot be read ends the
piece there, is logged once (per shard) and reported to the scheduler, which claims it no more."""

from __future__ import annotations

from prefixgen.errors import CorruptBlockError
from prefixgen.integrations.vllm.faults import STORE_FAULTS, warn_once
from prefixgen.integrations.vllm.reports import Reports
from prefixgen.integrations.vllm.staging import Staging
from prefixgen.store.index import BlockLocation
from prefixgen.store.reader import PrefixStore, ReadCount, StoredKV


class StoreReads:
    """Reads pieces of ``store`` for one worker, reporting what they read and found bad to ``reports``."""

    def __init__(self, store: PrefixStore, reports: Reports):
        self.store = store
        self._reports = reports

    def block_bytes(self, heads: range) -> int:
        """Host bytes one store block takes in a read buffer: ``heads`` as stored (a token-major store's every head,
        side by side in each token), fp8 as its bytes and scales (dequantized on the cache's device, loader.py)."""
        return self.store.staged_bytes(1, heads)

    def read(self, locations: list[BlockLocation], staging: Staging, heads: range, layers: range) -> tuple[StoredKV | None, int]:
        """KV heads ``heads`` of ``layers``, as stored (:class:`StoredKV`: no transpose, no conversion), of the leading
        blocks of ``locations`` that read cleanly, and how many they are; each fault is logged once per shard and
        reported to the scheduler. Read (pread) into ``staging``: the result is a view of it, whatever the store's
        order and dtype; the host does no per-byte work beyond the read (the loader converts it on the device)."""
        count = ReadCount()  # a head-major store gives this rank only its heads from disk
        try:
            return self._read_counted(locations, staging, heads, layers, count)
        finally:
            with self._reports.lock:
                self._reports.stats.read_bytes += count.bytes

    def _read_counted(
        self, locations: list[BlockLocation], staging: Staging, heads: range, layers: range, count: ReadCount
    ) -> tuple[StoredKV | None, int]:
        reports, stats = self._reports, self._reports.stats
        while locations:
            try:
                read = self.store.read_stored(  # in this thread: a read that hangs holds up this load only
                    locations,
                    "cpu",
                    heads=heads,
                    buffer=staging.tensor,
                    layers=layers,
                    threads=1,
                    count=count,
                )
                with reports.lock:
                    stats.pieces += 1
                    stats.max_piece_bytes = max(stats.max_piece_bytes, len(locations) * self.block_bytes(heads))
                    if read.kv.untyped_storage().data_ptr() != staging.tensor.untyped_storage().data_ptr():
                        stats.converted_bytes += read.kv.numel() * read.kv.element_size()
                return read, len(locations)
            except CorruptBlockError as exc:
                bad = locations[exc.block]
                with reports.lock:
                    stats.corrupt_blocks += 1
                    reports.bad.bad_blocks.add((bad.shard, bad.slot))
                warn_once(reports.logged, bad.shard, "PrefixgenConnector: %s; vLLM recomputes it", exc)
                locations = locations[: exc.block]
            except STORE_FAULTS as exc:
                locations = locations[: self._first_unreadable(locations, exc, count)]
        return None, 0

    def _first_unreadable(self, locations: list[BlockLocation], exc: Exception, count: ReadCount) -> int:
        """Where in ``locations`` the shard that raised ``exc`` starts (read again one shard at a time, unchecked);
        that shard is reported bad. 0 when every shard reads now (a passing fault): the load stops here."""
        reports = self._reports
        start = 0
        while start < len(locations):
            shard = locations[start].shard
            end = next((i for i in range(start, len(locations)) if locations[i].shard != shard), len(locations))
            try:
                self.store.read_locations(locations[start:end], verify=False, threads=1, count=count)
            except STORE_FAULTS as again:
                with reports.lock:
                    reports.bad.bad_shards.add(shard)
                if warn_once(
                    reports.logged, shard, "PrefixgenConnector: %s; its blocks are not loaded, vLLM computes them", again
                ):
                    with reports.lock:
                        reports.stats.failed_shards += 1
                return start
            start = end
        warn_once(reports.logged, str(exc), "PrefixgenConnector: %s; vLLM computes the rest of the prefix", exc)
        return 0
