"""A byte-level tokenizer built in memory, for the tiny test models (no download, no files).

Every byte is one token, so any text round-trips; ids 0..3 are the special tokens.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
TINY_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

# A minimal ChatML-style template so chat-template code paths can be tested offline.
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@lru_cache(maxsize=1)
def _backend() -> Tokenizer:
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh byte-level tokenizer with pad/bos/eos/unk and a chat template."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_backend(),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
