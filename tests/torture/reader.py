"""A reader child of the torture harness: loads stored prefixes until told to stop, and reports every
error it sees as one line ``ERROR <type>: <message>`` on stdout (a prefix that is not stored is no
error: ``load`` returns an empty cache for it).

It keeps one ``PrefixStore`` opened at its start (as a server does across a prune or a compaction)
and also opens the store afresh every round (as a new process does during a compaction's unlinks).

Usage: python reader.py STORE PROMPTS.json STOP_FILE
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> None:
    store_path, prompts_path, stop = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    from prefixgen.store.reader import PrefixStore

    prompts = json.loads(prompts_path.read_text())
    while not (store_path / "manifest.json").exists() and not stop.exists():
        time.sleep(0.05)  # nothing to read yet: the store is created by a build of this step
    kept = None
    seen: set[str] = set()
    loads = 0
    while not stop.exists():
        for ids in prompts:
            try:
                if kept is None:
                    kept = PrefixStore.open(store_path)
                kept.load(ids)
                fresh = PrefixStore.open(store_path)
                fresh.find_prefix(fresh.keys(ids))
                loads += 1
            except Exception as exc:  # every error but "not stored" breaks the reader's contract
                line = f"ERROR {type(exc).__name__}: {' '.join(str(exc).split())}"
                if line not in seen:
                    seen.add(line)
                    print(line, flush=True)
            if stop.exists():
                break
    print(f"LOADS {loads}", flush=True)


if __name__ == "__main__":
    main()
