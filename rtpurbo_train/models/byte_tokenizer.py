"""A byte-level tokenizer built in code, for the tiny random models.

Ids 0..255 are the bytes of the UTF-8 text (id == byte value), then `<bos>` 256, `<eos>` 257,
`<pad>` 258. Nothing is added automatically around a text (like SmolLM2's tokenizer), so a text of
n UTF-8 bytes is exactly n tokens. Deterministic, needs no files, round-trips through
`save_pretrained` / `AutoTokenizer.from_pretrained` like any fast tokenizer.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BYTE_VOCAB = 256
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map (what the ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def build_byte_tokenizer(model_max_length: int = 16384) -> PreTrainedTokenizerFast:
    """A fresh byte-level tokenizer: vocabulary 259 (256 bytes + bos/eos/pad)."""
    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    for i, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = BYTE_VOCAB + i
    # BPE without merges over the byte alphabet = one token per byte.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: with no merges the split changes nothing, and skipping it is faster.
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
