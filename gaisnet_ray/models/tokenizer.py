"""An offline byte-level tokenizer: 4 specials + 256 byte symbols, no merges, no downloads.

It is a real ``PreTrainedTokenizerFast`` (built with the ``tokenizers`` library), so it saves next
to the model and reloads with ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with ids 0..3 for <pad>, <bos>, <eos>, <unk> and 4..259 for bytes."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk_token"]))
    # use_regex=False: every byte is its own pre-token, so encode/decode round-trip exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
