"""Incremental detokenization and stop handling, on small tokenizers trained here."""
import functools

import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kevlarflow.engine.detokenizer import (MAX_CONTEXT_TOKENS, MAX_HELD_TOKENS, IncrementalDetokenizer,
                                           StopChecker, should_stop_on_token)
from kevlarflow.engine.params import SamplingParams

CORPUS = [
    "héllo wörld ✓ 日本語",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café — déjà vu; 東京 and 大阪 are cities in 日本.",
    "emoji: 🙂🚀 and math: ∑ x² ≤ ∞",
    "hello hello world, the world says hello",
]
EOS = "<|endoftext|>"


@functools.cache
def byte_level_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


@functools.cache
def metaspace_bpe() -> Tokenizer:
    """A SentencePiece-style tokenizer: its decoder drops the leading space of a decode."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=[EOS], show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def token_ids(tokenizer, max_size):
    return st.lists(st.integers(0, tokenizer.get_vocab_size() - 1), max_size=max_size)


def byte_token(tokenizer, byte):
    """The id of the one-byte token for `byte`. Byte-level BPE spells bytes as
    characters: printable latin-1 bytes as themselves, the others from U+0100 on."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    char = chr(byte) if byte in printable else chr(256 + others.index(byte))
    return tokenizer.token_to_id(char)


class CountingTokenizer:
    """Records the longest id list it was asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def decode(self, ids, skip_special_tokens):
        self.longest = max(self.longest, len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def stream(detokenizer, ids, chunk_sizes):
    deltas, i = [], 0
    for size in chunk_sizes:
        deltas.append(detokenizer.add_tokens(ids[i:i + size]))
        i += size
    deltas.append(detokenizer.add_tokens(ids[i:]))
    deltas.append(detokenizer.flush())
    return deltas


def chunkings():
    return st.lists(st.integers(1, MAX_CHUNK), max_size=60)


MAX_CHUNK = 4
# Context, held tokens and the newest chunk: a bound that does not grow with the output.
MAX_WINDOW = MAX_CONTEXT_TOKENS + 2 * (MAX_HELD_TOKENS + MAX_CHUNK) + 2


@settings(max_examples=150, deadline=None)
@given(ids=token_ids(byte_level_bpe(), 60), chunk_sizes=chunkings(), skip=st.booleans())
def test_deltas_add_up_to_the_full_decode(ids, chunk_sizes, skip):
    tokenizer = byte_level_bpe()
    counting = CountingTokenizer(tokenizer)
    deltas = stream(IncrementalDetokenizer(counting, skip_special_tokens=skip), ids, chunk_sizes)
    full = tokenizer.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)
    # Only a short window of recent tokens is ever decoded.
    assert counting.longest <= MAX_WINDOW


@pytest.mark.parametrize("skip", [True, False])
def test_window_stays_short_over_long_outputs(skip):
    tokenizer = byte_level_bpe()
    eos = tokenizer.token_to_id(EOS)
    text_ids = tokenizer.encode(" ".join(CORPUS)).ids
    garbage = [byte_token(tokenizer, b) for b in (0x80, 0xE6, 0xBF, 0xF0)] * 20
    ids = text_ids + [eos] * 50 + text_ids + garbage + text_ids
    counting = CountingTokenizer(tokenizer)
    deltas = stream(IncrementalDetokenizer(counting, skip_special_tokens=skip), ids, [1] * len(ids))
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip)
    assert counting.longest <= MAX_WINDOW


@settings(max_examples=80, deadline=None)
@given(text=st.text(alphabet="héllo wörld✓日本語🙂 ab\n", max_size=40), chunk_sizes=chunkings())
def test_real_text_streams_without_replacement_chars(text, chunk_sizes):
    tokenizer = byte_level_bpe()
    ids = tokenizer.encode(text).ids
    deltas = stream(IncrementalDetokenizer(tokenizer), ids, chunk_sizes)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_split_character_is_held_until_complete():
    tokenizer = byte_level_bpe()
    ids = [tokenizer.token_to_id("a")] + [byte_token(tokenizer, b) for b in "日".encode()]
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert [detokenizer.add_tokens([i]) for i in ids] == ["a", "", "", "日"]
    # A dangling lead byte comes out as U+FFFD only when the stream ends.
    assert detokenizer.add_tokens([byte_token(tokenizer, 0xE6)]) == ""
    assert detokenizer.flush() == "\ufffd"


def test_invalid_bytes_are_not_held_forever():
    tokenizer = byte_level_bpe()
    continuation = byte_token(tokenizer, 0x80)  # never valid on its own
    detokenizer = IncrementalDetokenizer(tokenizer)
    streamed = "".join(detokenizer.add_tokens([continuation]) for _ in range(3 * MAX_HELD_TOKENS))
    assert streamed.count("\ufffd") >= 2 * MAX_HELD_TOKENS
    assert streamed + detokenizer.flush() == "\ufffd" * 3 * MAX_HELD_TOKENS


def test_transformers_tokenizer_gives_the_same_deltas():
    transformers = pytest.importorskip("transformers")
    tokenizer = byte_level_bpe()
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)
    ids = tokenizer.encode("naïve café ✓ 日本語 🙂").ids + [tokenizer.token_to_id(EOS)]
    for skip in (True, False):
        plain = stream(IncrementalDetokenizer(tokenizer, skip), ids, [1] * len(ids))
        hf = stream(IncrementalDetokenizer(wrapped, skip), ids, [1] * len(ids))
        assert hf == plain
        assert "".join(hf) == wrapped.decode(ids, skip_special_tokens=skip)


@settings(max_examples=60, deadline=None)
@given(ids=token_ids(metaspace_bpe(), 40), chunk_sizes=chunkings())
def test_leading_space_decoders_add_up_too(ids, chunk_sizes):
    tokenizer = metaspace_bpe()
    deltas = stream(IncrementalDetokenizer(tokenizer), ids, chunk_sizes)
    assert "".join(deltas) == tokenizer.decode(ids)


# --- stop strings ---------------------------------------------------------

def split_at(text, cuts):
    cuts = sorted(set(c for c in cuts if 0 < c < len(text)))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def run_stop_checker(checker, deltas):
    streamed = []
    for delta in deltas:
        check = checker.add_text(delta)
        streamed.append(check.text)
        if check.stopped:
            return "".join(streamed), True
    return "".join(streamed) + checker.flush(), False


def reference_stop(text, stops, include):
    """The shortest prefix of text that ends with a stop string (the longest
    stop on a tie), cut before that stop or after it."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            stop = max(hits, key=len)
            return (text[:end] if include else text[:end - len(stop)]), True
    return text, False


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab\nc", max_size=30),
       stops=st.lists(st.text(alphabet="ab\nc", min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=10), include=st.booleans())
def test_stop_strings_across_deltas(text, stops, cuts, include):
    checker = StopChecker(stops, include_stop_str_in_output=include)
    streamed, stopped = run_stop_checker(checker, split_at(text, cuts))
    # Streaming is append-only, so equality means nothing was leaked and retracted.
    assert (streamed, stopped) == reference_stop(text, stops, include)


def test_stop_string_spanning_deltas_is_never_streamed():
    checker = StopChecker(["</answer>"])
    deltas = ["The answer is 42<", "/ans", "wer", "> and more"]
    streamed = [checker.add_text(d) for d in deltas[:3]]
    assert [c.text for c in streamed] == ["The answer is 42", "", ""]
    assert checker.add_text(deltas[3]) == ("", True)
    assert checker.add_text("late text") == ("", True)


def test_false_start_of_a_stop_string_is_released():
    checker = StopChecker(["STOP"])
    assert checker.add_text("a ST") == ("a ", False)
    assert checker.add_text("ART") == ("START", False)
    assert checker.add_text(" ST") == (" ", False)
    assert checker.flush() == "ST"


def test_detokenizer_and_stop_checker_together():
    tokenizer = byte_level_bpe()
    params = SamplingParams(stop=["wörld"], include_stop_str_in_output=True)
    ids = tokenizer.encode("héllo wörld ✓ 日本語").ids
    detokenizer, checker = IncrementalDetokenizer(tokenizer), StopChecker.from_params(params)
    streamed = ""
    for token in ids:
        check = checker.add_text(detokenizer.add_tokens([token]))
        streamed += check.text
        if check.stopped:
            break
    assert streamed == "héllo wörld" and checker.stopped


@pytest.mark.parametrize("token,params,eos,expected", [
    (2, SamplingParams(), 2, "stop"),
    (2, SamplingParams(ignore_eos=True), 2, None),
    (5, SamplingParams(), 2, None),
    (5, SamplingParams(stop_token_ids=[5]), 2, "stop"),
    (5, SamplingParams(stop_token_ids=[5], ignore_eos=True), 2, "stop"),
    (7, SamplingParams(), [2, 7], "stop"),
    (7, SamplingParams(), None, None),
])
def test_should_stop_on_token(token, params, eos, expected):
    assert should_stop_on_token(token, params, eos) == expected
