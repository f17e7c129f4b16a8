"""The tokenizer spec is cached by the content of the tokenizer's files: a later driver reads it
back without ``transformers``, and a changed tokenizer file is never served a stale spec."""

from __future__ import annotations

import shutil
import subprocess
import sys

from pipeline.infra.config import StorageConfig
from pipeline.infra.io import Storage
from pipeline.model.tokenizer import tokenizer_spec

MODEL = "models/tiny-selfrag"
TOKENIZER_ONLY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json")


def test_the_cached_spec_equals_the_built_one_and_follows_the_files(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name in TOKENIZER_ONLY:
        shutil.copy(f"{MODEL}/{name}", model / name)
    storage = Storage(StorageConfig(cache_dir=str(tmp_path / "cache")))
    built = tokenizer_spec(storage, str(model))
    cached = list((tmp_path / "cache" / "tokenizer-specs").glob("*.json"))
    assert len(cached) == 1
    assert tokenizer_spec(storage, str(model)) == built  # read back from the file

    code = ("import sys; from pipeline.infra.io import Storage; from pipeline.infra.config import StorageConfig; "
            "from pipeline.model.tokenizer import tokenizer_spec; "
            f"spec = tokenizer_spec(Storage(StorageConfig(cache_dir={str(tmp_path / 'cache')!r})), {str(model)!r}); "
            "print(len(spec.special), spec.bos, 'transformers' in sys.modules)")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert fresh == [str(len(built.special)), str(built.bos), "False"]  # a new process: no transformers import

    config = (model / "tokenizer_config.json").read_text()
    (model / "tokenizer_config.json").write_text(config.replace("{", '{"model_max_length": 77, ', 1))
    assert tokenizer_spec(storage, str(model)) == built  # same tokens: the same spec, under another digest
    assert len(list((tmp_path / "cache" / "tokenizer-specs").glob("*.json"))) == 2
