"""Bounded tokenization: a long record is tokenized only as far as --max-tokens needs, and its ids
are exactly those of tokenizing the whole text and cutting, wherever the cut falls."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from prefixgen.data import records
from prefixgen.data.records import RecordTokenizer
from prefixgen.format import BuildRecord

from .conftest import CHAT_TEMPLATE, MT_BENCH


def _texts() -> list[str]:
    rows = [json.loads(line) for line in MT_BENCH.read_text().splitlines()]
    prose = "\n\n".join(t for row in rows[:40] for t in row["turns"])  # real English: punctuation, digits, lists
    return [
        prose,
        prose.replace(" ", "  "),  # runs of spaces
        "antidisestablishmentarianism" * 400,  # one long word: every cut is mid-word
        "Once upon a time, 日本語のテキストと emoji 🙂🙂 mixed in. " * 200,  # multi-byte characters
        "a\n" * 3000,
        "short text",  # shorter than any cut
    ]


def _byte_level_bpe() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (trained here, offline) whose post-processor appends an EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tk.train_from_iterator(_texts()[:1], trainer)
    tk.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


@pytest.fixture(scope="module", params=["stories", "byte_level_bpe"])
def tokenizer(request, stories):
    if request.param == "stories":  # SentencePiece-style BPE over the whole text (no pre-tokenizer split)
        return AutoTokenizer.from_pretrained(stories)
    return _byte_level_bpe()


@pytest.mark.parametrize("chars_per_token", [1, 3, records.CHARS_PER_TOKEN])  # 1 and 3: cuts too short, retried
@pytest.mark.parametrize("chat", [False, True])
def test_ids_equal_tokenizing_the_whole_text_and_cutting(monkeypatch, tokenizer, chars_per_token, chat):
    monkeypatch.setattr(records, "CHARS_PER_TOKEN", chars_per_token)
    tokenizer.chat_template = CHAT_TEMPLATE  # chat records are tokenized without special tokens
    texts = _texts()
    whole = tokenizer(texts, add_special_tokens=not chat).input_ids
    mid_word = 0
    for max_tokens in [1, 2, 7, 16, 31, 64, 100, 257, 500, 1023]:
        rt = RecordTokenizer(tokenizer, BuildRecord("", ""), max_tokens, chat=chat)
        got = rt.ids(texts)
        for text, ids, (cut_ids, cut) in zip(texts, whole, got):
            assert cut_ids == ids[:max_tokens], (max_tokens, text[:40])
            assert cut == (len(ids) > max_tokens)
            c = max_tokens * chars_per_token + 64  # where the first cut fell
            mid_word += c < len(text) and text[c - 1].isalnum() and text[c].isalnum()
    assert mid_word >= 10  # the cases under test: cuts inside a word


def test_records_are_tokenized_only_as_far_as_the_limit_needs(stories):
    """The work is bounded: a 100,000-character record costs about as much as the limit, not its length."""
    tok = AutoTokenizer.from_pretrained(stories)
    text = _texts()[0] * 8
    calls: list[int] = []

    class Counting:  # the real tokenizer, with the characters it is given counted
        chat_template = None

        def __call__(self, texts, **kw):
            calls.extend(map(len, texts))
            return tok(texts, **kw)

    ((ids, cut),) = RecordTokenizer(Counting(), BuildRecord("", ""), 1024).ids([text])
    assert cut and ids == tok(text).input_ids[:1024]
    assert len(text) > 100_000 and sum(calls) < 1024 * records.CHARS_PER_TOKEN * 2
