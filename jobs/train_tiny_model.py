"""Train the tiny Self-RAG model of the embedded default (models/tiny-selfrag) on CPU.

    python -m jobs.train_tiny_model [--steps 7000] [--out models/tiny-selfrag] [--seed 0]

1. Trains a byte-level BPE tokenizer on the synthetic world's text, in which every invented
   word of the lexicon (names, values, years) is a single token, and adds the 15 reflection
   tokens and ``<pad>`` as special tokens.
2. Trains a small Llama (``transformers``; head_dim 64, which vLLM's CPU attention needs) on
   examples drawn fresh at every step (``pipeline.synthetic.training_data``): knowledge
   questions with their passage or another entity's, and no-knowledge questions. A copy
   curriculum starts with many one-sentence passages. The loss covers neither the prompt nor
   the paragraph. Every ``--long-form-every``-th step is a batch of long-form (two-segment)
   examples: they are about twice as long, and batching them apart keeps the other batches
   short (batches are padded to their longest example).
3. Every ``--eval-every`` steps, prints the loss and teacher-forced checks on the held-out
   split of the demo world (right retrieval token, right critique token, answer copied from
   the passage, answer copied from a counterfactual passage).
4. Writes weights (safetensors), tokenizer, config and a model card to ``--out``.
"""

from __future__ import annotations

import argparse
import json

from pipeline.synthetic.tiny_training import train


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and train."""
    parser = argparse.ArgumentParser(prog="python -m jobs.train_tiny_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=7000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--critique-weight", type=float, default=4.0,
                        help="loss weight of the [Relevant] / [Irrelevant] targets (others: 1)")
    parser.add_argument("--long-form-every", type=int, default=8, metavar="N",
                        help="every N-th step trains on a batch of long-form examples (0: never)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--out", default="models/tiny-selfrag")
    args = parser.parse_args(argv)
    print(json.dumps(train(args)), flush=True)


if __name__ == "__main__":
    main()
