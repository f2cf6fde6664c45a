"""Tokenizers built locally (no model hub): a word-level vocabulary for synthetic tasks."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace-split tokenizer over ``words`` plus pad/bos/eos (ids 0, 1, 2).

    Decoding joins tokens with spaces, so ``decode(encode(t)) == t`` for space-separated text.
    """
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, *words])}
    if len(vocab) != len(words) + 3:
        raise ValueError("duplicate or reserved words in the vocabulary")
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, clean_up_tokenization_spaces=False
    )
