"""Write the embedded demo data: the synthetic world's passages as a corpus, and two query shards.

Usage::

    python -m jobs.make_demo_assets [--out-data data/demo] [--seed 0]

Everything is derived from the synthetic world of ``pipeline.synthetic.world`` and from
``--seed``, so running the script twice writes byte-identical files. The model of the
embedded default is trained by ``python -m jobs.train_tiny_model``.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from pipeline.synthetic.demo_assets import write_demo_data
from pipeline.synthetic.world import build_world


def describe(paths: list[Path]) -> None:
    """Print each written file with its size and a short sha256."""
    for path in paths:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        print(f"wrote {path}  {path.stat().st_size:>9,d} bytes  sha256 {digest}")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and write the demo data."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-data", type=Path, default=Path("data/demo"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    describe(write_demo_data(build_world(seed=args.seed), args.out_data, args.seed))


if __name__ == "__main__":
    main()
