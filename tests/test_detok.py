"""Incremental detokenization and stop strings, on tiny tokenizers built in-test."""
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from eyas.detok import IncrementalDetokenizer, find_stop, partial_stop_len

TEXTS = [
    "Hello world, café crème brûlée.",
    "日本語のテキスト: 日本 and 東京 🦅",
    "emoji 🦅🎉 party 👍🏽 ok, naïve façade résumé!",
    "plain ascii text with   spaces\nand a newline",
]


@pytest.fixture(scope="module")
def byte_bpe():
    """A GPT-2-style byte-level BPE; with few merges most multi-byte chars span several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Hello world, café crème hello world text the and"] * 10 + TEXTS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def sentencepiece_like():
    """A Llama-style tokenizer: '▁' for spaces, byte fallback, decoder strips one leading space."""
    chars = "▁abcdefghijklmnopqrstuvwxyzHW,.!"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    vocab.update({c: len(vocab) + i for i, c in enumerate(chars)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _stream(tokenizer, prompt, ids, chunks=1, stop=(), flush=True):
    """Push ids in chunks of `chunks` (or random sizes if chunks is a Random); return (deltas, detok)."""
    detok = IncrementalDetokenizer(tokenizer, prompt, stop=stop)
    deltas, i = [], 0
    while i < len(ids) and not detok.stopped:
        n = chunks.randint(1, 4) if isinstance(chunks, random.Random) else chunks
        delta, _ = detok.push(ids[i:i + n])
        deltas.append(delta)
        assert detok.text == "".join(deltas)
        i += n
    if flush:
        deltas.append(detok.flush())
    return deltas, detok


def test_tokenizer_splits_characters(byte_bpe):
    ids = byte_bpe.encode("🦅")
    assert len(ids) > 1 and "\ufffd" in _decode(byte_bpe, ids[:1])  # the tests below need this


@pytest.mark.parametrize("chunks", [1, 2, 3, random.Random(0)])
def test_deltas_concatenate_to_decode(byte_bpe, chunks):
    prompt = byte_bpe.encode("Prompt: 日")
    for text in TEXTS:
        ids = byte_bpe.encode(text)
        deltas, detok = _stream(byte_bpe, prompt, ids, chunks)
        assert "".join(deltas) == _decode(byte_bpe, ids) == text
        assert detok.text == text
        assert not any("\ufffd" in d for d in deltas)


def test_nothing_held_back_once_characters_complete(byte_bpe):
    ids = byte_bpe.encode(TEXTS[2])
    detok = IncrementalDetokenizer(byte_bpe, [])
    for i, t in enumerate(ids):
        detok.push([t])
        full = _decode(byte_bpe, ids[:i + 1])
        if not full.endswith("\ufffd"):
            assert detok.text == full
        else:
            assert full.startswith(detok.text) and "\ufffd" not in detok.text


def test_random_ids_match_decode_after_flush(byte_bpe):
    rng = random.Random(1)
    for _ in range(30):
        ids = [rng.randrange(len(byte_bpe)) for _ in range(rng.randint(1, 25))]
        deltas, _ = _stream(byte_bpe, [rng.randrange(len(byte_bpe))], ids, rng)
        full = _decode(byte_bpe, ids)
        assert "".join(deltas) == full
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas)


def test_special_tokens_skipped(byte_bpe):
    eos = byte_bpe.eos_token_id
    ids = byte_bpe.encode("Hello") + [eos] + byte_bpe.encode(" world") + [eos]
    deltas, _ = _stream(byte_bpe, [], ids)
    assert "".join(deltas) == "Hello world"
    detok = IncrementalDetokenizer(byte_bpe, [], skip_special_tokens=False)
    detok.push(ids)
    assert detok.text + detok.flush() == "Hello<|endoftext|> world<|endoftext|>"


def test_window_stays_short(byte_bpe):
    """Each step decodes only a few ids, however long the output grows."""
    lengths = []
    original = byte_bpe.decode

    class Spy:
        def decode(self, ids, **kw):
            lengths.append(len(ids))
            return original(ids, **kw)

    ids = byte_bpe.encode(" ".join(TEXTS) * 20)
    deltas, _ = _stream(Spy(), byte_bpe.encode("a prompt of some length here"), ids)
    assert "".join(deltas) == _decode(byte_bpe, ids)
    assert len(ids) > 500 and max(lengths) <= 10


def test_leading_space_kept_with_sentencepiece_style(sentencepiece_like):
    tok = sentencepiece_like
    prompt = tok.encode("Hi", add_special_tokens=False)
    full = tok.encode("Hi there, café world!", add_special_tokens=False)
    out = full[len(prompt):]
    assert tok.convert_ids_to_tokens(out[0]) == "▁"  # output starts with a space token
    for chunks in (1, 2, random.Random(2)):
        deltas, _ = _stream(tok, prompt, out, chunks)
        assert "".join(deltas) == " there, café world!"
        assert not any("\ufffd" in d for d in deltas)
    deltas, _ = _stream(tok, [], full)  # no prompt: the decode of the output itself
    assert "".join(deltas) == _decode(tok, full) == "Hi there, café world!"


# ---- stop strings ----

def test_find_stop_and_partial():
    assert find_stop("hello world", 0, ["wor"]) == 6
    assert find_stop("hello world", 8, ["wor"]) == 6  # ends after position 8
    assert find_stop("hello world", 9, ["wor"]) is None  # ends at 9: wholly in the old text
    assert find_stop("hello world", 9, ["llo"]) is None  # wholly inside the old text
    assert find_stop("xab", 1, ["b", "ab"]) == 1  # earliest wins
    assert partial_stop_len("hello wor", ["world"]) == 3
    assert partial_stop_len("hello wor", ["xyz", "or!", "r"]) == 2
    assert partial_stop_len("hello", ["world"]) == 0
    assert partial_stop_len("ab", ["abc"]) == 2


@pytest.mark.parametrize("chunks", [1, 2, random.Random(3)])
@pytest.mark.parametrize("text,stop,expected", [
    ("Hello world, café crème brûlée.", "crème", "Hello world, café "),
    ("Hello world, café crème brûlée.", "é cr", "Hello world, caf"),
    ("日本語のテキスト: 日本 and 東京 🦅", "日本 and", "日本語のテキスト: "),
    ("emoji 🦅🎉 party 👍🏽 ok", "🎉", "emoji 🦅"),
    ("emoji 🦅🎉 party 👍🏽 ok", "ok", "emoji 🦅🎉 party 👍🏽 "),
    ("Hello world", "Hello", ""),
])
def test_stop_string_truncates(byte_bpe, chunks, text, stop, expected):
    ids = byte_bpe.encode(text)
    deltas, detok = _stream(byte_bpe, [], ids, chunks, stop=("never", stop), flush=False)
    assert detok.stopped and detok.stop_str == stop
    assert "".join(deltas) == detok.text == expected
    assert detok.push(byte_bpe.encode("more")) == ("", True)


def test_stream_never_emits_text_later_cut(byte_bpe):
    text = "the cat sat on the mat, then the cat ran"
    ids = byte_bpe.encode(text)
    for stop in ("the cat ran", "mat,", "t r", "n th"):
        detok = IncrementalDetokenizer(byte_bpe, [], stop=[stop])
        emitted = ""
        for t in ids:
            delta, stopped = detok.push([t])
            emitted += delta
            assert text[:text.index(stop)].startswith(emitted)
            if stopped:
                break
        assert emitted == text[:text.index(stop)]


def test_partial_stop_released_when_not_a_stop(byte_bpe):
    ids = byte_bpe.encode("Hello world")
    detok = IncrementalDetokenizer(byte_bpe, [], stop=["world!"])
    delta, stopped = detok.push(ids)
    assert not stopped and delta == "Hello " and detok.text == "Hello "
    assert detok.flush() == "world"
    detok = IncrementalDetokenizer(byte_bpe, [], stop=["worm"])
    first, _ = detok.push(ids[:-1])
    rest, stopped = detok.push(ids[-1:])
    assert not stopped and first + rest == "Hello world"


def test_consumed_counts_ids_up_to_the_stop(byte_bpe):
    text = "Hello world, café crème brûlée."
    ids = byte_bpe.encode(text)
    detok = IncrementalDetokenizer(byte_bpe, [], stop=["café"])
    delta, stopped = detok.push(ids)
    assert stopped and delta == "Hello world, "
    # the stop is complete after exactly `consumed` ids, not one fewer
    assert "café" in _decode(byte_bpe, ids[:detok.consumed])
    assert "café" not in _decode(byte_bpe, ids[:detok.consumed - 1])
    plain = IncrementalDetokenizer(byte_bpe, [])
    plain.push(ids)
    assert plain.consumed == len(ids)


def test_shipped_tokenizer(smollm2_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    prompt = tok.encode("Say something:")
    for text in TEXTS:
        ids = tok.encode(text)
        deltas, _ = _stream(tok, prompt, ids, random.Random(4))
        assert "".join(deltas) == _decode(tok, ids)
        assert not any("\ufffd" in d for d in deltas)
    deltas, detok = _stream(tok, prompt, tok.encode(TEXTS[0]), stop=["crème"], flush=False)
    assert "".join(deltas) == "Hello world, café "
