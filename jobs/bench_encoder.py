"""Encoder benchmark: passages/s as the index build embeds, against the model alone.

    python -m jobs.bench_encoder [--random-contriever] [--device cuda] [--passages N] [--dtype D] ...

Generates DPR-like passages (a title and 100 words, about 124 tokens; some shorter, as the last
passage of an article) and measures, on the device it finds (cuda when there is one):

- ``model_only_passages_per_s``: the model alone, on pre-tokenized ids, ``Encoder.encode_tokens``
  over windows of ``--window`` passages (each sorted by length and run in batches of
  ``--batch-size``), as the build's embed actor runs one batch;
- ``passages_per_s``: as the build embeds, in one process: ``--tokenizer-workers`` processes
  tokenize chunks of passages (``tokenize``, the build's CPU stage) while the model runs the
  windows they fill, in corpus order; the time runs from the first text to the last vector;
- ``encoder_efficiency`` = passages_per_s / model_only_passages_per_s (1.0: the GPU never
  waits for the tokenizer);
- ``cosine_vs_float32_min``: the chosen dtype's vectors against float32 ones, on a sample.

``--random-contriever`` builds a BERT-base-shaped encoder (Contriever's shape: hidden 768,
12 layers, 12 heads, vocabulary 30,522) with random weights around the BERT uncased WordPiece
tokenizer in models/bert-wordpiece-tokenizer, so it runs offline with no model download.
Needs only torch, transformers and numpy (no Ray, FAISS, vLLM, pyarrow or OmegaConf). Prints
progress and figures; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.bench.encoder import MINILM, benchmark, default_device


def main(argv: list[str] | None = None) -> int:
    """Entrypoint: runs the benchmark; returns 0."""
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_encoder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=default_device(), help="default: cuda when there is one")
    parser.add_argument("--encoder", default=MINILM, help=f"encoder name or local path (default {MINILM})")
    parser.add_argument("--random-contriever", action="store_true",
                        help="a BERT-base-shaped encoder with random weights (offline, Contriever's shape)")
    parser.add_argument("--passages", type=int, help="default: 200,000 on cuda, 2,000 on cpu")
    parser.add_argument("--batch-size", type=int, help="the model's batch (default: 1024 on cuda, 64 on cpu)")
    parser.add_argument("--window", type=int, help="passages sorted by length together, as one batch of "
                        "the build's embed actor (default: 16 batches)")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float16 on cuda, "
                        "float32 on cpu, as retrieval.dtype=null)")
    parser.add_argument("--tokenizer-workers", type=int,
                        help="tokenizer processes (default: min(8, cores - 2) on cuda, 1 on cpu)")
    args = parser.parse_args(argv)
    benchmark(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
