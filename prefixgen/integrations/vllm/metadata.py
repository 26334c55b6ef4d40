"""What the two sides of the connector tell each other each step: the scheduler the workers which loads to do and
which live checks to make (:class:`PrefixgenConnectorMetadata`), the workers the scheduler which stored blocks
failed and what the checks measured (:class:`PrefixgenWorkerMetadata`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from prefixgen.integrations.vllm.check import CheckResult, CheckSpec
from prefixgen.store.index import BlockLocation


@dataclass(slots=True)
class LoadSpec:
    """One request's load, from the scheduler to every worker: write tokens ``[start, end)`` of
    its prompt from the store blocks at ``locations`` (store block ``first_block`` onwards)."""

    req_id: str
    start: int  # vLLM had computed the tokens before it (its own prefix-cache hit)
    end: int  # the stored prefix ends here
    first_block: int  # store block number of locations[0]
    locations: list[BlockLocation]
    block_ids: list[list[int]]  # the request's vLLM block table per KV cache group, null blocks -1 (groups.py)
    state: bytes | None = None  # a hybrid model: the key of the block after which the recurrent state is (states.py)


@dataclass
class PrefixgenConnectorMetadata(KVConnectorMetadata):
    """What the scheduler tells the workers for one step: the loads to do before the forward."""

    loads: list[LoadSpec] = field(default_factory=list)
    checks: list[CheckSpec] = field(default_factory=list)  # live checks of this step's forward (check.py)
    idle: bool = False  # the step schedules no token: the engine has nothing to run but waits for loads


@dataclass
class PrefixgenWorkerMetadata(KVConnectorWorkerMetadata):
    """What the workers tell the scheduler after a step: stored blocks that failed to load, so that
    it stops claiming them (until the engine restarts)."""

    bad_blocks: set[tuple[str, int]] = field(default_factory=set)  # (shard, slot) failing its checksum
    bad_shards: set[str] = field(default_factory=set)  # shards missing, truncated or unreadable
    checks: list[CheckResult] = field(default_factory=list)  # live checks measured (each rank its heads and layers)
    weights_changed: bool = False  # the model's weights differ from when the check passed: loads refused
    # Recurrent states (by their block's key) missing or damaged: a claim ends on another one. Its block's KV
    # is not at fault (a gc or prune may remove a state whose block is kept): later claims still load it.
    bad_states: set[bytes] = field(default_factory=set)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, PrefixgenWorkerMetadata)
        return PrefixgenWorkerMetadata(
            self.bad_blocks | other.bad_blocks,
            self.bad_shards | other.bad_shards,
            self.checks + other.checks,
            self.weights_changed or other.weights_changed,
            self.bad_states | other.bad_states,
        )
