"""The token ids the evaluation's probes read: reflection tokens and end of sequence."""

from __future__ import annotations

from ..infra.io import Storage
from . import log
from .metrics import TokenInfo


def token_info(storage: Storage, model: str | None) -> TokenInfo | None:
    """Reflection and end-of-sequence token ids from the model's tokenizer, read with ``storage``
    (None, with a note, when it cannot be loaded: the probes then read the candidates' raw text)."""
    if not model:
        return None
    try:
        from transformers import AutoTokenizer, GenerationConfig

        from ..selfrag.tokens import IRRELEVANT, ISUSE_GROUP, RELEVANT, ReflectionIds
        from ..model.tokenizer import TOKENIZER_FILES

        local = storage.localize(model, only=TOKENIZER_FILES)
        tok = AutoTokenizer.from_pretrained(local)
        ids = ReflectionIds.from_lookup(tok.convert_tokens_to_ids, tok.unk_token_id)
        eos = {tok.eos_token_id} - {None}
        try:
            extra = GenerationConfig.from_pretrained(local).eos_token_id
            eos |= set(extra if isinstance(extra, list) else [extra]) - {None}
        except Exception:  # noqa: BLE001 - no generation config: the tokenizer's eos only
            pass
        return TokenInfo(relevant=ids[RELEVANT], irrelevant=ids[IRRELEVANT],
                         utility=tuple(ids.ids(ISUSE_GROUP)), eos=tuple(sorted(eos)))
    except Exception as exc:  # noqa: BLE001
        log(f"note: cannot load the tokenizer of {model!r} ({type(exc).__name__}: {exc}); "
            "probes read raw text and well_formed_rate is not measured")
        return None
