"""Write tests/data/vllm_request_prompts.json and, on stdout, the request log lines vLLM 0.32.0 writes
for those prompts served as completions with ``--enable-log-requests --log-level DEBUG``: vLLM's own
logging config (``configure_logging``, as ``vllm serve`` applies ``--log-level``), its ``RequestLogger``
and its tokenizer (``vllm.tokenizers.get_tokenizer``, ``encode`` with special tokens, as its renderer
tokenizes a completion prompt), with a ``/tokenize`` request among them. Run in the vLLM venv from the repository root::

    VLLM_LOGGING_COLOR=0 .venv-vllm/bin/python tests/data/make_vllm_request_log.py > tests/data/vllm_request_log.txt
"""

import json
from pathlib import Path

from vllm.config.logging import LoggingConfig
from vllm.entrypoints.serve.utils.request_logger import RequestLogger
from vllm.logger import configure_logging
from vllm.sampling_params import SamplingParams
from vllm.tokenizers import get_tokenizer

REPO = Path(__file__).resolve().parent.parent.parent
texts = [json.loads(line)["text"] for line in (REPO / "examples" / "stories.jsonl").read_text().splitlines()[:12]]
# A prompt quoting a log line of its own, with quotes and a newline: only vLLM's own ids are taken.
texts.append("She said \"Request x details: prompt: 'a', prompt_token_ids: [7, 8], prompt_embeds shape: None.\"\nThen")
(REPO / "tests" / "data" / "vllm_request_prompts.json").write_text(json.dumps(texts, indent=1) + "\n")

configure_logging(LoggingConfig(log_level="DEBUG"))
tokenizer = get_tokenizer(str(REPO / "models" / "stories260K"))
logger = RequestLogger(max_log_len=None)
for i, text in enumerate(texts):
    ids = tokenizer.encode(text, add_special_tokens=True)
    logger.log_inputs(f"cmpl-{i:04x}-0", text, ids, None, SamplingParams(max_tokens=16), None)
    if i == 3:  # a /tokenize request between them: logged, but no prompt served
        logger.log_inputs("tokenize-5e1f", "Tokenize me", tokenizer.encode("Tokenize me"), None, None, None)
