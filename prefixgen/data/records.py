"""Step 2 of the build: records to token ids, exactly as a server will tokenize the same request.

* Text records: ``tokenizer(text).input_ids``, the tokenizer's defaults (special tokens included).
* Chat records: ``tokenizer.apply_chat_template(messages, tokenize=False,
  add_generation_prompt=<last message is the user's>)`` then ``tokenizer(rendered,
  add_special_tokens=False)``: what vLLM and transformers' ``serve`` do for a chat request.

* Records of token ids (``--ids-field``): the list as it is (no tokenizer call, no chat template,
  no BOS added), as a server that was given these ids (or tokenized its request into them) holds
  them. A record is skipped (and counted) when its list is empty, holds anything but integers
  (``True`` and ``1.0`` too), or an id outside the model's vocabulary (``0 <= id < vocab_size`` of
  its config: the rows of its embedding, past which no id can be prefilled; vLLM refuses ids past
  the larger of that and its tokenizer's largest id). A field holding text is refused at the
  dataset's first record (:func:`open_records`: before anything is written); a later record of
  text is skipped like any other odd one.

Empty or non-text records are skipped; records longer than the limit are truncated. Both are
counted in the build record.

Bounded tokenization: a record is cut to ``max_tokens`` tokens, so only a prefix of a long text is
tokenized: about ``CHARS_PER_TOKEN`` characters per token allowed, grown until it gives at least
``MARGIN`` tokens more than the limit (or is the whole text). The ids kept are those of tokenizing
the whole text and cutting: a cut changes only the tokens at its end (pre-tokenizers split the
text into words that are tokenized apart; BPE merges are local within one), and those are past the
limit by ``MARGIN`` tokens. tests/test_records.py checks it on real tokenizers at every cut.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

from prefixgen.data.source import Record, read_records
from prefixgen.errors import ConfigError, DatasetError
from prefixgen.format import BuildRecord

CHUNK = 256  # records tokenized per call: fast tokenizers batch in Rust
FIRST_CHUNK = 8  # the first calls take fewer, doubling up to CHUNK, so the first batch is ready soon
CHARS_PER_TOKEN = 6  # text tokenized per token allowed, at first (most tokenizers average 2 to 5)
MARGIN = 32  # tokens past the limit that a cut text must give, so the cut cannot reach the kept ids


@dataclass(slots=True)
class TokenizedRecord:
    index: int
    ids: list[int]
    # Token counts where a chat's earlier turns end as a server's prompt (the chat rendered up to a user
    # turn, with the generation prompt): only when asked (``turn_ends``), for hybrid models' states.
    ends: tuple[int, ...] = ()


def normalize_messages(value: Any, system_prompt: str | None) -> list[dict[str, str]] | None:
    """A chat as ``[{"role", "content"}, ...]``, or None if ``value`` is not a chat.

    A list of plain strings is read as alternating user and assistant turns, user first.

    Example:
        >>> normalize_messages(["Hi", "Hello!"], "Be brief.")
        [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]
    """
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(m, str) for m in value):
        messages = [{"role": ("user", "assistant")[i % 2], "content": m} for i, m in enumerate(value)]
    elif all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
    else:
        return None
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def open_records(cfg: Any) -> Iterator[Record]:
    """The records ``prefixgen build``, ``analyze`` and ``simulate`` read for ``cfg`` (a BuildConfig):
    its field (``--ids-field``, ``--messages-field`` or ``--text-field``) of each row of the dataset,
    up to ``--limit``. The dataset and its first row are read now; with ``--ids-field``, a first row
    whose field holds text is refused here, so bad input fails before any work.

    Example:
        >>> next(open_records(BuildConfig(dataset="examples/stories.jsonl"))).value[:16]  # doctest: +SKIP
        'Once upon a time'
    """
    records = read_records(cfg.dataset, cfg.record_field, cfg.split, cfg.subset, cfg.limit)
    if cfg.ids_field is None:
        return records
    first = next(records, None)
    if first is None:
        return iter(())
    if isinstance(first.value, str):
        raise DatasetError(text_not_ids(cfg.dataset, cfg.ids_field, first))
    return itertools.chain([first], records)


def text_not_ids(dataset: str, field: str, record: Record) -> str:
    """The refusal of a field of text read as token ids, with the fix."""
    return (
        f"--ids-field {field}: {record.name} of {dataset} holds text ({record.value[:40]!r}), not a list of token ids: "
        f"pass --text-field {field} to tokenize it"
    )


def bad_ids(value: Any, vocab_size: int) -> tuple[str, str] | None:
    """Why ``value`` is not a record of token ids (a kind, for warning once per kind, and the
    reason), or None if it is one: a non-empty list of ints, each in ``[0, vocab_size)``.

    Example:
        >>> bad_ids([1, 2, 3], 512) is None, bad_ids([1, 2, 512], 512), bad_ids([1, True], 512)[0]
        (True, ('vocab', 'holds token id 512, outside the vocabulary of 512 ids (0 to 511)'), 'int')
    """
    if not isinstance(value, list | tuple):
        return "list", f"holds {type(value).__name__}, not a list of token ids"
    if not value:
        return "empty", "holds an empty list of token ids"
    if not all(type(i) is int for i in value):  # noqa: E721 - bool is an int subclass, and is refused
        odd = next(i for i in value if type(i) is not int)  # noqa: E721
        return "int", f"holds {odd!r} ({type(odd).__name__}), not an integer token id"
    low, high = min(value), max(value)
    if low < 0 or high >= vocab_size:
        return (
            "vocab",
            f"holds token id {low if low < 0 else high}, outside the vocabulary of {vocab_size} ids (0 to {vocab_size - 1})",
        )
    return None


class RecordTokenizer:
    """Turns a stream of Records into TokenizedRecords, counting into a BuildRecord.

    Example:
        >>> tok = RecordTokenizer(tokenizer, stats, max_tokens=512)  # doctest: +SKIP
        >>> next(tok(records)).ids[:4]  # doctest: +SKIP
        [403, 407, 261, 378]
    """

    @classmethod
    def for_options(
        cls, tokenizer: Any, model_config: Any, cfg: Any, stats: BuildRecord, warn: Callable[[str], None] = print
    ) -> RecordTokenizer:
        """The tokenization ``prefixgen build`` does for ``cfg`` (a BuildConfig, or any object with its
        dataset fields): records cut to ``--max-tokens`` and the model's max positions, chats rendered
        with the system prompt. build, analyze and simulate all make theirs here, so they agree.

        Example:
            >>> tok = RecordTokenizer.for_options(tokenizer, model.config, cfg, stats)  # doctest: +SKIP
        """
        text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        max_positions = int(getattr(text_config, "max_position_embeddings", 0) or 0) or 1 << 62
        ids = getattr(cfg, "ids_field", None) is not None
        return cls(
            tokenizer,
            stats,
            min(cfg.max_tokens or max_positions, max_positions),
            chat=cfg.messages_field is not None,
            system_prompt=cfg.system_prompt,
            warn=warn,
            # the rows of the model's embedding (a tokenizer may have fewer ids); its length where a config has none
            vocab_size=(int(getattr(text_config, "vocab_size", 0) or 0) or len(tokenizer)) if ids else None,
        )

    def __init__(
        self,
        tokenizer: Any,
        stats: BuildRecord,
        max_tokens: int,
        chat: bool = False,
        system_prompt: str | None = None,
        warn: Callable[[str], None] = print,
        vocab_size: int | None = None,
        turn_ends: bool = False,
    ):
        """``vocab_size``: records are token ids below it, used as they are (``--ids-field``);
        None: records are text (or chats, with ``chat``), tokenized. ``turn_ends``: give each chat
        record the ``ends`` of its earlier turns (a hybrid model keeps its recurrent state there)."""
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "--messages-field needs a chat template, and this model's tokenizer has none: "
                "pass --chat-template FILE (a Jinja template)"
            )
        self.tokenizer = tokenizer
        self.stats = stats
        self.max_tokens = max_tokens
        self.chat = chat
        self.system_prompt = system_prompt
        self.warn = warn
        self.vocab_size = vocab_size
        self.turn_ends = turn_ends
        self._warned: set[str] = set()

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            self.warn(message)

    def _text(self, value: Any) -> str | None:
        if self.chat:
            messages = normalize_messages(value, self.system_prompt)
            if messages is None:
                return None
            try:
                return self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=messages[-1]["role"] == "user"
                )
            except Exception as exc:  # a template may reject a role order; skip that record
                self._warn_once("template", f"warning: the chat template rejected a record ({exc}); skipping such records")
                return None
        if not isinstance(value, str) or not value.strip():
            return None
        return f"{self.system_prompt}{value}" if self.system_prompt else value

    def ids(self, texts: list[str]) -> list[tuple[list[int], bool]]:
        """Token ids of each text cut to ``max_tokens``, and whether it was cut; equal to tokenizing
        the whole text and cutting, but a long text is tokenized only as far as the limit needs.

        Example:
            >>> RecordTokenizer(tokenizer, stats, max_tokens=4).ids(["Once upon a time, there was"])  # doctest: +SKIP
            [([403, 407, 261, 378], True)]
        """
        out: list[tuple[list[int], bool]] = [([], False)] * len(texts)
        todo = list(range(len(texts)))
        chars = self.max_tokens * CHARS_PER_TOKEN + 64
        while todo:
            pieces = [texts[i][:chars] for i in todo]
            retry = []
            for i, piece, ids in zip(todo, pieces, self.tokenizer(pieces, add_special_tokens=not self.chat)["input_ids"]):
                if len(piece) == len(texts[i]) or len(ids) >= self.max_tokens + MARGIN:
                    out[i] = (ids[: self.max_tokens], len(ids) > self.max_tokens)
                else:  # the cut came too close to the limit: tokenize more of this text
                    retry.append(i)
            todo, chars = retry, chars * 2
        return out

    def copy(self, stats: BuildRecord) -> RecordTokenizer:
        """The same tokenization, counting into ``stats``, without warnings (a pass that only
        counts: the build pass warns)."""
        other = copy.copy(self)
        other.stats, other.warn, other._warned = stats, lambda _: None, set()
        return other

    def __call__(self, records: Iterator[Record]) -> Iterator[TokenizedRecord]:
        if self.vocab_size is not None:
            yield from self._token_ids(records)
            return
        size = FIRST_CHUNK
        while chunk := list(islice(records, size)):
            size = min(CHUNK, size * 2)
            texts, kept = [], []
            for record in chunk:
                text = self._text(record.value)
                if text is None:
                    self.stats.skipped_records += 1
                    self._warn_once("skip", f"warning: {record.name} is empty or not text; skipping such records (counted)")
                    continue
                texts.append(text)
                kept.append(record)
            if not texts:
                continue
            for record, (ids, cut) in zip(kept, self.ids(texts)):
                self.stats.records += 1
                if cut:
                    self.stats.truncated_records += 1
                    self._warn_once(
                        "truncate",
                        f"warning: {record.name} has more than the limit of {self.max_tokens} tokens; "
                        "truncating such records (counted)",
                    )
                self.stats.dataset_tokens += len(ids)
                ends = self._turn_ends(record.value, ids) if self.turn_ends and self.chat else ()
                yield TokenizedRecord(record.index, ids, ends)

    def _turn_ends(self, value: Any, ids: list[int]) -> tuple[int, ...]:
        """Lengths of the prompts a server sees before each assistant turn of a chat (rendered up to
        the user turn before it, with the generation prompt), where they are a prefix of ``ids``."""
        messages = normalize_messages(value, self.system_prompt) or []
        prompts = []
        for k, message in enumerate(messages[:-1]):
            if message["role"] != "user":
                continue
            try:
                prompts.append(self.tokenizer.apply_chat_template(messages[: k + 1], tokenize=False, add_generation_prompt=True))
            except Exception:  # the whole chat rendered, so this is a template's quirk: no state there
                continue
        if not prompts:
            return ()
        ends = [len(p) for p in self.tokenizer(prompts, add_special_tokens=False)["input_ids"] if ids[: len(p)] == p]
        return tuple(e for e in ends if e < len(ids))

    def _token_ids(self, records: Iterator[Record]) -> Iterator[TokenizedRecord]:
        """Records of token ids: each checked, cut to ``max_tokens`` and counted as text records are."""
        assert self.vocab_size is not None
        for record in records:
            bad = bad_ids(record.value, self.vocab_size)
            if bad is not None:
                kind, reason = bad
                if isinstance(record.value, str):
                    kind, reason = "text", "holds text, not a list of token ids"
                self.stats.skipped_records += 1
                self._warn_once(f"ids-{kind}", f"warning: {record.name} {reason}; skipping such records (counted)")
                continue
            ids = list(record.value[: self.max_tokens])
            self.stats.records += 1
            if len(record.value) > self.max_tokens:
                self.stats.truncated_records += 1
                self._warn_once(
                    "truncate",
                    f"warning: {record.name} has more than the limit of {self.max_tokens} tokens; "
                    "truncating such records (counted)",
                )
            self.stats.dataset_tokens += len(ids)
            yield TokenizedRecord(record.index, ids)
