"""An offline byte-level tokenizer: 4 specials + 256 byte symbols, no merges, no downloads.

It is a real ``PreTrainedTokenizerFast`` (built with the ``tokenizers`` library), so it saves next
to the model and reloads with ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

if TYPE_CHECKING:  # transformers (and with it torch) loads only when the tokenizer object is built
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}


def byte_vocab() -> dict[str, int]:
    """Symbol -> id: <pad>, <bos>, <eos>, <unk> as 0..3, then the 256 byte symbols as 4..259."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    return vocab


def byte_special_ids() -> dict[str, int]:
    """``pad_token_id``, ``bos_token_id``, ``eos_token_id`` of the byte tokenizer (no transformers import)."""
    vocab = byte_vocab()
    return {f"{k}_id": vocab[SPECIAL_TOKENS[k]] for k in ("bos_token", "eos_token", "pad_token")}


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with ids 0..3 for <pad>, <bos>, <eos>, <unk> and 4..259 for bytes."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab=byte_vocab(), merges=[], unk_token=SPECIAL_TOKENS["unk_token"]))
    # use_regex=False: every byte is its own pre-token, so encode/decode round-trip exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
