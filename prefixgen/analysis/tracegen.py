"""Generated request traces in Mooncake's format, shaped like its conversation trace: for tests,
benchmarks and the README's worked example (the real traces are not shipped).

Sessions open with one of a few system prompts (Zipf-popular, 1,000 to 6,000 tokens) and a first
user message (a document or long question, log-normal, median 6,000 tokens); each later turn's
prompt is the previous prompt plus the answer and a new user message, so consecutive turns share
all but their last blocks. Sessions start as a Poisson stream and their turns follow each other
after a think time, interleaved with other sessions'. ``hash_ids`` chain exactly as Mooncake's do:
block i's id stands for the block's tokens and everything before it (a partial last block is a
different block from the full one a later turn has at the same place).

Example:
    >>> rows = conversation_trace(200, seed=1)
    >>> len(rows), sorted(rows[0])
    (200, ['hash_ids', 'input_length', 'output_length', 'timestamp'])

    python -m prefixgen.analysis.tracegen --requests 12031 --out trace.jsonl
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
from pathlib import Path


def conversation_trace(
    requests: int = 12031,
    block_tokens: int = 512,
    seed: int = 0,
    system_prompts: int = 30,
    mean_turns: float = 4.0,
    rate_per_s: float = 3.5,
) -> list[dict]:
    """``requests`` Mooncake-format rows (``timestamp`` in ms, ``input_length``, ``output_length``,
    ``hash_ids``), in timestamp order."""
    rng = random.Random(seed)
    sys_len = [rng.randint(1000, 6000) for _ in range(system_prompts)]
    sys_weight = [1 / (i + 1) ** 1.1 for i in range(system_prompts)]
    ids: dict[tuple, int] = {}  # (parent id, block label) -> hash id

    def hash_ids(session: int, system: int, length: int) -> list[int]:
        out, parent = [], -1
        for i in range(math.ceil(length / block_tokens)):
            end = min((i + 1) * block_tokens, length)
            label = ("s", system, i, end) if end <= sys_len[system] else ("c", session, i, end)
            parent = ids.setdefault((parent, label), len(ids))
            out.append(parent)
        return out

    # Events: (time ms, session, turn, system prompt, tokens so far, turns left).
    events: list[tuple[float, int, int, int, int, int]] = []
    t, session = 0.0, 0
    rows: list[dict] = []
    while len(rows) < requests:
        # Start sessions ahead of the earliest pending turn, so the stream stays interleaved.
        while not events or t <= events[0][0]:
            system = rng.choices(range(system_prompts), sys_weight)[0]
            first = sys_len[system] + int(rng.lognormvariate(math.log(6000), 0.8))
            turns = 1 + int(rng.expovariate(1 / (mean_turns - 1)))
            heapq.heappush(events, (t, session, 0, system, first, turns))
            session += 1
            t += rng.expovariate(rate_per_s / mean_turns) * 1000
        now, sid, turn, system, length, left = heapq.heappop(events)
        output = max(1, int(rng.lognormvariate(math.log(300), 0.6)))
        rows.append(
            {"timestamp": int(now), "input_length": length, "output_length": output, "hash_ids": hash_ids(sid, system, length)}
        )
        if left > 1:
            grown = length + output + int(rng.lognormvariate(math.log(250), 1.0))
            heapq.heappush(events, (now + rng.uniform(20_000, 300_000), sid, turn + 1, system, grown, left - 1))
    return rows


def write_trace(path: str | Path, rows: list[dict]) -> Path:
    """Write rows as JSON lines (Mooncake's trace format)."""
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a generated conversation trace in Mooncake's format.")
    parser.add_argument("--requests", type=int, default=12031)
    parser.add_argument("--block-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = conversation_trace(args.requests, args.block_tokens, args.seed)
    write_trace(args.out, rows)
    blocks = sum(len(r["hash_ids"]) for r in rows)
    print(
        f"{args.out}: {len(rows):,} requests, {blocks:,} blocks, {sum(r['input_length'] for r in rows) / len(rows):,.0f} mean input tokens"
    )


if __name__ == "__main__":
    main()
