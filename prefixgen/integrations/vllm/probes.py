"""The workers' half of the live check (:mod:`.check`): after a step's forward, vLLM's KV of each probe's stored
blocks against the store's (this rank's heads, read in staging pieces as a load reads them), and the watch on the
model's weights that refuses loads once they changed."""

from __future__ import annotations

import time
from typing import Any

from prefixgen.integrations.vllm.check import CheckResult, CheckSpec, WeightsWatch, compare_blocks, relative_errors, tolerance
from prefixgen.integrations.vllm.faults import logger
from prefixgen.integrations.vllm.loader import Loader
from prefixgen.integrations.vllm.metadata import PrefixgenConnectorMetadata
from prefixgen.integrations.vllm.reports import Reports


class LiveChecks:
    """One rank's live checks, reading the store through ``loader`` (its layers, heads and staging buffers)."""

    def __init__(self, loader: Loader, reports: Reports, num_blocks: int, check_tolerance: float | None):
        self._loader = loader
        self._reports = reports
        self._num_blocks = num_blocks
        self._watch: WeightsWatch | None = None  # made in watch()
        self.weights_changed = False  # found since the last step's report (guarded by the reports' lock where read)
        kv = loader.store.manifest.kv
        self.limit = check_tolerance or tolerance(kv.storage, kv.dtype, str(loader.dtype).removeprefix("torch."))

    def watch(self, model: Any) -> None:
        """Watch ``model``'s weights (vLLM's model holding the registered layers; None: not found)."""
        if model is not None:
            self._watch = WeightsWatch(model)
        else:
            logger.warning(
                "PrefixgenConnector: cannot find vLLM's model: weights changed in place without reset_cache() are only "
                "found by the sampled live checks (check_rate)"
            )

    def weights_match(self) -> bool:
        """Whether the model's weights are those the last passing check saw (else they are reported changed)."""
        if self._watch is None or self._watch.unchanged():
            return True
        if self._watch.reference is not None:
            self.weights_changed = True
            self._watch.reference = None  # loads stay refused until a check passes on the new weights
        return False

    def run(self, meta: PrefixgenConnectorMetadata | None) -> list[CheckResult]:
        """This step's live checks: vLLM's KV of each probe's stored blocks against the store's (this rank's heads)."""
        if not isinstance(meta, PrefixgenConnectorMetadata) or not meta.checks:
            return []
        t0 = time.perf_counter()
        results = [self._check(spec) for spec in meta.checks]
        if self._watch is not None and results and all(r.passed for r in results):
            self._watch.mark()
        with self._reports.lock:
            self._reports.stats.check_seconds += time.perf_counter() - t0
        return results

    def _check(self, spec: CheckSpec) -> CheckResult:
        """One probe: its stored blocks, read in staging pieces (a check's memory is a load's), against vLLM's KV of
        them; a failed read gives no verdict."""
        loader = self._loader
        sums = None
        step = loader.piece_blocks()
        bs = loader.store.block_size
        for i in range(0, len(spec.locations), step):
            piece = spec.locations[i : i + step]
            staging = loader.staging.acquire()
            try:
                read, good = loader.read(piece, staging)
                if good < len(piece):
                    sums = None
                    break
                first = (spec.first_block + i) * bs
                tables = [(spec.block_ids[g], loader.groups[g].block_size) for g in loader.layer_groups]
                kv = read.rows(loader.dtype)  # [good * bs, this stage's layers, 2, this rank's heads, D] on the host
                part = compare_blocks(
                    loader.layers, loader.stage.start, kv, first, min(spec.end, first + good * bs), tables,
                    self._num_blocks, loader.key_order,
                )  # fmt: skip
            finally:
                loader.staging.release(staging)
            sums = part if sums is None else sums + part
        if sums is None:
            return CheckResult(spec.req_id, 0, [], [], [], self.limit, failed_read=True)
        k_err, v_err = relative_errors(sums)
        layers = [index for _, index in loader.layers]
        return CheckResult(spec.req_id, spec.end - spec.start, layers, k_err, v_err, self.limit)
