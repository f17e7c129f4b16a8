"""The tiny model's tokenizer: a byte-level BPE trained on the synthetic world's text, in which
every invented word of the lexicon is one token, with the reflection tokens and ``<pad>`` as
special tokens (``python -m jobs.train_tiny_model``)."""

from __future__ import annotations

import random
import re

from ..selfrag.prompts import PAPER_INSTRUCTIONS, format_prompt
from ..selfrag.tokens import ALL_REFLECTION_TOKENS
from .training_data import sample_example
from .world import lexicon

REFLECTION_TOKENS = list(ALL_REFLECTION_TOKENS)
BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
BPE_VOCAB = 3000  # BPE ids before the special tokens are added


def tokenizer_corpus(seed: int = 0, examples: int = 4000) -> list[str]:
    """Texts the BPE is trained on: sampled training examples, every lexicon word and number
    (several times, so each becomes one token) and the task instructions."""
    rng = random.Random(seed)
    # split at the special tokens, as the tokenizer does before pre-tokenizing
    special = re.compile("|".join(re.escape(t) for t in REFLECTION_TOKENS + [BOS, EOS]))
    texts = [piece for _ in range(examples) for piece in special.split(sample_example(rng).text) if piece]
    words = lexicon().words() + [v for pool in lexicon().pools.values() for v in pool if v.isdigit()]
    texts += [" ".join([w] * 8) for w in words] + [" ".join(str(n) for n in range(100))] * 8
    texts += [format_prompt(t) for t in PAPER_INSTRUCTIONS.values()] + ["A: B: C: D: true false"]
    return texts


def build_tokenizer(seed: int = 0):
    """Byte-level BPE (a space is prefixed to every piece, so a word reads the same at the
    start of a piece and mid-sentence) wrapped as ``PreTrainedTokenizerFast``; prepends ``<s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=[UNK, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(seed), trainer=trainer)
    tok.add_special_tokens(REFLECTION_TOKENS + [PAD])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=REFLECTION_TOKENS, clean_up_tokenization_spaces=False,
        model_max_length=2048)
    check_tokenizer(fast)
    return fast


def check_tokenizer(tok) -> None:
    """Raise ValueError unless every lexicon word is one token and the reflection tokens are
    distinct single ids that round-trip."""
    words = lexicon().words() + [v for pool in lexicon().pools.values() for v in pool]
    split = [w for w in words if len(tok(f"is {w}.", add_special_tokens=False).input_ids) != 3]
    if split:
        raise ValueError(f"{len(split)} lexicon words are not single tokens, e.g. {split[:5]}")
    ids = [tok.convert_tokens_to_ids(t) for t in REFLECTION_TOKENS]
    if tok.unk_token_id in ids or len(set(ids)) != len(ids):
        raise ValueError(f"reflection tokens are not distinct known ids: {ids}")
    text = "".join(REFLECTION_TOKENS)
    if tok.decode(tok(text, add_special_tokens=False).input_ids) != text:
        raise ValueError("reflection tokens do not round-trip")
