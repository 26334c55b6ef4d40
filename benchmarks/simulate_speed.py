"""Replay speed of ``prefixgen simulate``: block lookups per second per policy (target: >= 1 million),
on a generated trace shaped like Mooncake's conversation trace (12,031 requests, 512-token blocks).

    python benchmarks/simulate_speed.py [--requests 12031] [--capacities 1%,3%,10%,30%]

A block lookup is one block of one scored request (every block is looked up or touched once per
replay). Prints one JSON object: per policy and capacity, wall and CPU seconds and lookups per
second of each (CPU time is what the replay itself costs when other jobs share the cores); and the
end-to-end time of ``simulate`` over every policy and capacity, reading the trace included.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefixgen.analysis.policies import POLICIES  # noqa: E402
from prefixgen.analysis.simulate import Replay, parse_capacities, read_mooncake, replay, simulate  # noqa: E402
from prefixgen.analysis.tracegen import conversation_trace, write_trace  # noqa: E402
from prefixgen.config import SimulateConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=12031)
    parser.add_argument("--capacities", default="1%,3%,10%,30%")
    parser.add_argument("--repeat", type=int, default=3, help="replays per run; the fastest counts")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = write_trace(Path(tmp) / "conversation.jsonl", conversation_trace(args.requests))
        t = time.perf_counter()
        trace = read_mooncake(path, 512)
        read_s = time.perf_counter() - t
        rep = Replay.of(trace, None)
        capacities = parse_capacities(args.capacities, None, trace.n_ids)
        blocks = len(trace.ids)
        runs = []
        for name in POLICIES:
            for capacity in capacities:
                wall = cpu = float("inf")
                for _ in range(args.repeat):
                    w, c = time.perf_counter(), time.process_time()
                    replay(rep, name, capacity)
                    wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
                runs.append(
                    {
                        "policy": name,
                        "capacity_blocks": capacity,
                        "wall_s": round(wall, 4),
                        "cpu_s": round(cpu, 4),
                        "lookups_per_s_wall": round(blocks / wall),
                        "lookups_per_s_cpu": round(blocks / cpu),
                    }
                )
        t = time.perf_counter()
        simulate(SimulateConfig(source=str(path), trace_format="mooncake", capacity=args.capacities))
        end_to_end = time.perf_counter() - t
    print(
        json.dumps(
            {
                "requests": trace.requests,
                "blocks": blocks,
                "distinct_blocks": trace.n_ids,
                "read_trace_s": round(read_s, 3),
                "simulate_all_s": round(end_to_end, 3),
                "min_lookups_per_s_cpu": min(r["lookups_per_s_cpu"] for r in runs),
                "min_lookups_per_s_wall": min(r["lookups_per_s_wall"] for r in runs),
                "runs": runs,
                "python": platform.python_version(),
                "machine": platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
