"""vLLM request log lines to a .jsonl of token ids, for ``prefixgen build --ids-field prompt_token_ids``.

vLLM 0.32.0 run with ``--enable-log-requests --log-level DEBUG`` logs each request's prompt, after its
own tokenization (chat template and BOS included), in one line (vllm/entrypoints/serve/utils/
request_logger.py, ``RequestLogger.log_inputs``)::

    (APIServer pid=7) DEBUG 12-05 10:29:26 [entrypoints/.../utils/request_logger.py:55] Request cmpl-3f2a-0 details: prompt: 'Once upon a time', prompt_token_ids: [1, 403, 407, 261], prompt_embeds shape: None.

Every such line becomes one record ``{"request_id": ..., "prompt_token_ids": [...]}``, in the order of
the log; other lines are ignored, and so are requests to ``/tokenize`` and ``/detokenize`` (ids
``tokenize-...``: vLLM logs them too, but serves no prompt) and requests given as embeddings (logged
with ``prompt_token_ids: None``). Completions are ``cmpl-<id>-<n>`` (one per prompt of the request),
chats ``chatcmpl-<id>``. Without ``--log-level DEBUG`` vLLM logs no token ids at all; with ``--max-log-len N`` it
logs only the first N of them: leave it unset.

Usage (stdlib only; reads the files given, or standard input)::

    python examples/vllm_request_log.py vllm.log > requests.jsonl
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator

# The prompt is written with %r, so it is one line; `.*` is greedy, so a prompt that holds this text
# itself cannot be taken for the ids: the match is the line's last one, vLLM's own.
NOT_SERVED = ("tokenize-",)  # request ids of /tokenize and /detokenize (vllm/entrypoints/serve/tokenize/serving.py)
LINE = re.compile(r"Request (\S+) details: prompt: .*, prompt_token_ids: \[([0-9, ]*)\], prompt_embeds shape: ")


def records(lines: Iterable[str]) -> Iterator[dict]:
    """One record per request line of a vLLM log: its request id and prompt token ids.

    Example:
        >>> line = "... Request cmpl-1-0 details: prompt: 'Hi', prompt_token_ids: [1, 15], prompt_embeds shape: None."
        >>> list(records([line]))
        [{'request_id': 'cmpl-1-0', 'prompt_token_ids': [1, 15]}]
    """
    for line in lines:
        m = LINE.search(line)
        if m is not None and not m.group(1).startswith(NOT_SERVED):
            ids = [int(t) for t in m.group(2).split(",") if t.strip()]
            yield {"request_id": m.group(1), "prompt_token_ids": ids}


def main(argv: list[str]) -> int:
    sources = [open(path, encoding="utf-8", errors="replace") for path in argv] or [sys.stdin]
    for source in sources:
        for record in records(source):
            sys.stdout.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
