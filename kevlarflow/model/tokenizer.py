"""A real byte-level BPE tokenizer for the random-weight test models.

It is trained, with the `tokenizers` library, on an English-like corpus that is
generated here from a fixed seed: no downloads, and the same bytes every time.
Special tokens take the first ids: <|begin_of_text|> (0, bos),
<|end_of_text|> (1, eos) and <|pad|> (2). As in Llama 3, the post-processor
prepends bos to every encoded sequence (add_special_tokens=True) and appends
no eos. Pre-tokenization follows the flavour (GPT-2's byte-level split for
llama, Qwen2's split for qwen2), so that transformers.AutoTokenizer and
`tokenizers` alone give the same ids for the same text.
"""
from __future__ import annotations

import functools
import random

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)

# The corpus does not follow the model seed: all models of one vocabulary size
# and flavour share a tokenizer, which is then trained once per process.
CORPUS_SEED = 20240601
CORPUS_SENTENCES = 12_000

COMMON_WORDS = """
the a an this that these those my your our their his her its some every no
and or but so because while when if then than though although until since
of in on at by for with from into over under after before between through about
is was are were be been has had have do does did will would can could should may
might must shall not very quite rather just still also only even again never
I you he she it we they me him us them who what which where why how
time year day way thing man woman child world life hand part place case week
house water room mother area money story fact month lot right study book eye
job word business issue side kind head night point home city river road garden
good new first last long great little own other old big high different small
large next early young important few public bad same able warm cold bright quiet
say make go know take see come think look want give use find tell ask work seem
feel try leave call run walk read write open close build carry hold bring keep
""".split()

# Pseudo-words give the corpus a long tail, so that BPE has something to merge
# well past the common words.
ONSETS = ("b bl br c ch cl cr d dr f fl fr g gl gr h j k l m n p pl pr qu r s sh sk sl sm sn sp st sw "
          "t th tr v w wh y z").split() + [""]
VOWELS = "a e i o u ai au ea ee ie oa oo ou y".split()
CODAS = [""] * 4 + "b ck d f g l ll m n nd ng nk nt p r rd rk rn rt s sh ss st t th x".split()
SUFFIXES = [""] * 6 + "s es ed ing er ly ness ment tion able ful less ish".split()
PUNCTUATION = [".", ".", ".", "!", "?", ";", "..."]


def _pseudo_word(rng: random.Random) -> str:
    syllables = rng.choice((1, 1, 1, 2, 2, 3))
    parts = [rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables)]
    return "".join(parts) + rng.choice(SUFFIXES)


def _zipf_cumulative_weights(n: int) -> list[float]:
    """Cumulative 1/rank weights (given cumulated, random.choices is O(log n))."""
    total, cumulative = 0.0, []
    for rank in range(1, n + 1):
        total += 1.0 / rank
        cumulative.append(total)
    return cumulative


def generated_corpus(seed: int = CORPUS_SEED, sentences: int = CORPUS_SENTENCES) -> list[str]:
    """Lines of English-like text: common words and pseudo-words drawn with
    Zipf-like frequencies, capitalised sentences, numbers, punctuation, and
    a sprinkle of non-ASCII so that multi-byte sequences get merges too."""
    rng = random.Random(seed)
    pseudo_words = sorted({_pseudo_word(rng) for _ in range(8_000)} - set(COMMON_WORDS))
    rng.shuffle(pseudo_words)
    lexicon = COMMON_WORDS + pseudo_words  # common words take the top ranks
    cum_weights = _zipf_cumulative_weights(len(lexicon))
    accents = ["café", "naïve", "façade", "über", "señor", "smörgåsbord", "Zürich", "—", "“quoted”", "€5"]

    lines = []
    for _ in range(sentences):
        words = rng.choices(lexicon, cum_weights=cum_weights, k=rng.randint(4, 18))
        if rng.random() < 0.15:
            number = rng.randint(0, 99) if rng.random() < 0.5 else rng.randint(1000, 2100)
            words.insert(rng.randrange(len(words)), str(number))
        if rng.random() < 0.05:
            words.insert(rng.randrange(len(words)), rng.choice(accents))
        if rng.random() < 0.2:
            words[rng.randrange(len(words) - 1)] += ","  # never just before the full stop
        sentence = " ".join(words)
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice(PUNCTUATION))
    return lines


# transformers (5.x) loads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer,
# which keeps the vocabulary and merges of tokenizer.json but rebuilds the
# normalizer and pre-tokenizer as below; the qwen2 flavour is trained with
# exactly these so that `tokenizers` and transformers give the same ids.
QWEN2_SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                       r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
PRE_TOKENIZATIONS = ("byte_level", "qwen2")


def _untrained_tokenizer(pre_tokenization: str) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.decoder = decoders.ByteLevel()
    if pre_tokenization == "byte_level":
        # GPT-2's split; add_prefix_space=False keeps decode(encode(text)) == text.
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif pre_tokenization == "qwen2":
        # Digits one by one; NFC, so round trips hold for NFC text only.
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        raise ValueError(f"unknown pre-tokenization {pre_tokenization!r}, "
                         f"expected one of {PRE_TOKENIZATIONS}")
    return tokenizer


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int, pre_tokenization: str) -> str:
    tokenizer = _untrained_tokenizer(pre_tokenization)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknowns
        show_progress=False,
    )
    tokenizer.train_from_iterator(generated_corpus(), trainer=trainer)
    # Llama 3 style: bos before each sequence, no eos appended.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS}:1 $B:1",
        special_tokens=[(BOS, tokenizer.token_to_id(BOS))],
    )
    return tokenizer.to_str(pretty=True)


def train_tokenizer(vocab_size: int, pre_tokenization: str = "byte_level") -> Tokenizer:
    """The trained tokenizer; training (about a second) runs once per process
    for each (vocab_size, pre_tokenization)."""
    return Tokenizer.from_str(_trained_tokenizer_json(vocab_size, pre_tokenization))


def tokenizer_config(tokenizer: Tokenizer, tokenizer_class: str, model_max_length: int) -> dict:
    """tokenizer_config.json for transformers.AutoTokenizer. bos prepending
    comes from tokenizer.json's post-processor (as in Llama 3), not from an
    add_bos_token flag, so every loader of tokenizer.json agrees."""
    added_tokens = {
        str(tokenizer.token_to_id(token)): {
            "content": token, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": True,
        }
        for token in SPECIAL_TOKENS
    }
    return {
        "added_tokens_decoder": added_tokens,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        # Byte-level BPE encodes anything; an explicit null also stops
        # Qwen2Tokenizer from adding its default unk, <|endoftext|>.
        "unk_token": None,
        "clean_up_tokenization_spaces": False,  # cleanup would break exact round trips
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "tokenizer_class": tokenizer_class,
    }


def special_tokens_map() -> dict:
    return {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
