"""The progress bar says what happened: records done (all blocks computed), not records read ahead."""

from __future__ import annotations

import json
import re

from tqdm import tqdm
from transformers import AutoTokenizer

from prefixgen.builder.plan import Planner, batch_tasks
from prefixgen.builder.progress import Progress
from prefixgen.data.records import TokenizedRecord
from prefixgen.data.source import count_records
from prefixgen.format import BuildRecord, block_keys, root_key


def test_records_count_when_all_their_blocks_are_computed_and_dedup_is_of_those(stories, text_dataset):
    tok = AutoTokenizer.from_pretrained(stories)
    texts = [json.loads(line)["text"] for line in text_dataset.read_text().splitlines()]
    records = [TokenizedRecord(i, tok(t).input_ids) for i, t in enumerate(texts)]
    root = root_key("00" * 32)
    computed: set[bytes] = set()
    progress = Progress(tqdm(disable=True), computed.__contains__)
    stats = BuildRecord("b", "d")
    planner = Planner(root, 16, 256, lambda keys: [False] * len(keys), stats, progress.planned)
    tasks = list(planner(iter(records)))  # the input thread has read and planned every record
    progress.update()
    assert progress.records == 0 and progress.dedup == 0.0  # nothing computed yet
    seen = []
    for batch in batch_tasks(iter(tasks), 256, 1):
        for task in batch.tasks:
            computed.update(task.new_keys)
            progress.computed(task.new_keys)
        progress.update()
        done = [r for r in records if all(k in computed for k in block_keys(r.ids, 16, root))]
        assert progress.records == len(done)
        assert progress.tokens == sum(len(r.ids) for r in done)
        seen.append(progress.records)
    assert 0 < seen[0] < seen[-1] == len(records)
    prefilled = sum(t.new_tokens for t in tasks)
    assert progress.new_tokens == prefilled == stats.stored_tokens
    assert abs(progress.dedup - (1 - prefilled / sum(len(r.ids) for r in records))) < 1e-12


def test_the_bar_shows_the_dataset_size_of_a_local_file(tmp_path, cli, stories, text_dataset):
    assert count_records(str(text_dataset)) == 60 and count_records(str(text_dataset), limit=7) == 7
    assert count_records("some/hub-dataset") is None
    result = cli("build", text_dataset, "--model", stories, "--out", tmp_path / "s", "--device", "cpu")
    assert result.exit_code == 0, result.output
    final = [line for line in re.split(r"[\r\n]", result.stderr) if "rec" in line][-1]
    summary = re.search(r"prefilled tokens  [\d,]+ \(([\d.]+)% of the dataset", result.stdout)
    assert "60/60" in final and f"dedup={round(float(summary.group(1)))}%" in final, final
