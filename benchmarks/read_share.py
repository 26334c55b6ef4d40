"""What a rank of a distributed build spends reading its count share, per MB of dataset: parsing
records (``read_records``, datasets streaming, as one process reads; ``read_share``, as a rank reads
its share) and counting line ends (what numbering a share's records in the dataset costs for the
bytes before it: the last of 64 shares, which counts those of 63/64 of the file and parses 1/64;
``local_index``: numbered within the share, as a rank of a distributed build reads it now, nothing
before it read).

    python benchmarks/read_share.py --mb 200
    python benchmarks/read_share.py --mb 200 --kind chat

The dataset is a .jsonl of ``--mb`` MB: text records (``--kind text``, ~2 KB each) or chats of four
messages (``--kind chat``, ``messages``); it is written once and read from the page cache. Prints
each way's seconds, records, MB parsed (read) and MB only scanned for line ends, and MB/s of both (the best of ``--repeat``
runs; datasets imported before).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from common import WORDS

from prefixgen.data.source import ShareRead, read_records, read_share


def make_dataset(path: Path, mb: int, kind: str) -> int:
    rng = random.Random(0)
    size, n = 0, 0
    with open(path, "w") as f:
        while size < mb << 20:
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(200, 500)))
            if kind == "chat":
                row = {"messages": [{"role": ("user", "assistant")[i % 2], "content": words[i::4]} for i in range(4)]}
            else:
                row = {"text": words}
            line = json.dumps(row) + "\n"
            f.write(line)
            size += len(line)
            n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=200)
    p.add_argument("--kind", choices=("text", "chat"), default="text")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prefixgen-read-"))
    try:
        data = work / "data.jsonl"
        records = make_dataset(data, args.mb, args.kind)
        field = "messages" if args.kind == "chat" else "text"
        size = data.stat().st_size / 1e6
        data.read_bytes()  # into the page cache
        next(read_records(str(data), field))  # imports datasets: not counted
        rows = {}
        for name, share, shares, local in [
            ("read_records (datasets)", 0, 0, False),
            ("read_share 0 of 1", 0, 1, False),
            ("read_share 63 of 64", 63, 64, False),
            ("read_share 63 of 64, local_index", 63, 64, True),
        ]:
            times = []
            for _ in range(args.repeat):  # the best of a few: the machine may be shared
                read = ShareRead()
                t = time.perf_counter()
                if shares:
                    stream = read_share(str(data), field, share, shares, read=read, local_index=local)
                else:
                    stream = read_records(str(data), field)
                n = sum(1 for _ in stream)
                times.append(time.perf_counter() - t)
            seconds = min(times)
            if not shares:
                read.records, read.bytes = n, data.stat().st_size
            rows[name] = {
                "seconds": round(seconds, 2), "records": read.records, "read_MB": round(read.bytes / 1e6, 1),
                "scanned_MB": round(read.scanned_bytes / 1e6, 1), "MB_s": round((read.bytes + read.scanned_bytes) / 1e6 / seconds),
            }  # fmt: skip
        print(
            json.dumps(
                {
                    "bench": "read_share",
                    "date": dt.date.today().isoformat(),
                    "kind": args.kind,
                    "MB": round(size),
                    "records": records,
                    "rows": rows,
                }
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
