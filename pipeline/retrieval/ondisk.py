"""IVF indexes built in bounded memory and searched from disk.

A trained IVF index (``IVF<n>,PQ<m>``, ``OPQ..,IVF..``, ...) receives the vectors with their row
numbers in the passage store. Every ``piece_size`` vectors its inverted lists are written to
piece files and emptied, so the build holds at most one piece of codes whatever the corpus
size. At the end the pieces are merged into FAISS on-disk inverted lists (``.ivfdata`` beside
each index file), which a search process maps instead of loading: it holds the coarse
quantizer and the code tables in RAM, the lists are page cache.

With ``shards`` > 1 the lists are dealt out to that many shard indexes (list ``l`` to shard
``l mod shards``), each with the whole quantizer. A search probes the same lists in every
shard, so the best hits of the union of the shards' best hits are exactly one index's best hits
(``search.merge_topk``): shards can live in different processes or on different nodes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: FAISS's k-means uses at most this many training points per list (it subsamples beyond it)
#: and warns below the second: the useful training sample of an IVF index lies between.
MAX_POINTS_PER_LIST, MIN_POINTS_PER_LIST = 256, 39
#: What the codebooks of a PQ with 256 centroids per sub-quantizer train on (256 per centroid).
PQ_TRAINING_POINTS = 65536


def ivf_of(index):
    """The IndexIVF inside ``index`` (bare or under a pre-transform such as OPQ) whose lists can
    go to disk, or None: indexes that are not IVF, whose refine stage holds every vector in RAM
    (``RFlat``), or whose lists are blocks of interleaved codes (fast-scan ``...x4fs``)."""
    import faiss

    if isinstance(faiss.downcast_index(index), faiss.IndexRefine):
        return None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or not isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists):
        return None
    return faiss.downcast_index(ivf)


def shard_file_names(shards: int) -> list[str]:
    """The index files of a version with ``shards`` shards (each with its ``.ivfdata``)."""
    if shards == 1:
        return ["index.faiss"]
    return [f"index-{i}-of-{shards}.faiss" for i in range(shards)]


def ivfdata_name(index_file: str) -> str:
    """The on-disk inverted lists that belong to an index file."""
    return index_file.rsplit(".", 1)[0] + ".ivfdata"


def training_sample_size(train_size: int, nlist: int) -> int:
    """How many vectors to buffer for training an IVF index of ``nlist`` lists: ``train_size``,
    but no more than k-means would use (``MAX_POINTS_PER_LIST`` per list, or what PQ codebooks
    use, if more); a warning when that is under FAISS's minimum for good centroids."""
    useful = min(train_size, max(MAX_POINTS_PER_LIST * nlist, PQ_TRAINING_POINTS))
    if useful < train_size:
        log.info("retrieval.train_size=%d is more than k-means uses for %d lists: buffering %d vectors",
                 train_size, nlist, useful)
    if useful < MIN_POINTS_PER_LIST * nlist:
        log.warning("retrieval.train_size=%d is under %d per list for %d lists (%d): the centroids will be poor; "
                    "raise retrieval.train_size", train_size, MIN_POINTS_PER_LIST, nlist, MIN_POINTS_PER_LIST * nlist)
    return useful


class OnDiskIVFWriter:
    """Adds vectors to a trained, empty IVF index in pieces on disk, then merges the pieces
    into ``shards`` index files with on-disk inverted lists in ``out_dir``."""

    def __init__(self, index, out_dir: Path, piece_size: int, shards: int):
        import faiss

        self.index, self.ivf = index, faiss.extract_index_ivf(index)
        if self.index.ntotal:
            raise ValueError("the IVF index must be empty when pieces start")
        self.empty = faiss.serialize_index(index)  # trained, no vectors: the start of every piece and shard
        self.out, self.piece_size, self.shards = out_dir, piece_size, shards
        self.pieces: list[list[Path]] = [[] for _ in range(shards)]

    def add(self, vectors: np.ndarray, first_row: int) -> None:
        """Add vectors whose passage-store rows start at ``first_row``."""
        rows = np.arange(first_row, first_row + len(vectors), dtype=np.int64)
        self.index.add_with_ids(vectors, rows)
        if self.index.ntotal >= self.piece_size:
            self._write_piece()

    def _write_piece(self) -> None:
        import faiss

        if self.index.ntotal == 0:
            return
        number = len(self.pieces[0])
        for shard in range(self.shards):
            path = self.out / f".piece-{shard}-{number}.faiss"
            faiss.write_index(self.index if self.shards == 1 else self._lists_of(shard), str(path))
            self.pieces[shard].append(path)
        self.index.reset()  # the trained quantizer and codebooks stay; the lists are emptied

    def _lists_of(self, shard: int):
        """A copy of the current piece with only the lists that belong to ``shard``."""
        import faiss

        part = faiss.deserialize_index(self.empty)
        source, target = self.ivf.invlists, faiss.extract_index_ivf(part)
        for lst in range(shard, self.ivf.nlist, self.shards):
            size = source.list_size(lst)
            if size:
                target.invlists.add_entries(lst, size, source.get_ids(lst), source.get_codes(lst))
                target.ntotal += size
        part.ntotal = target.ntotal
        return part

    def finish(self) -> tuple[list[str], int]:
        """Write the last piece, merge each shard's pieces into ``<index file>`` and its
        ``.ivfdata``, delete the pieces; returns (the files written, the vectors indexed)."""
        import faiss

        self._write_piece()
        files, total = [], 0
        for shard, name in enumerate(shard_file_names(self.shards)):
            index = faiss.deserialize_index(self.empty)
            pieces = [faiss.read_index(str(p), faiss.IO_FLAG_MMAP) for p in self.pieces[shard]]  # mapped, not loaded
            count = sum(piece.ntotal for piece in pieces)
            if count:  # (an empty shard keeps its empty lists in the index file: nothing to map)
                ivf = faiss.extract_index_ivf(index)
                lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(self.out / ivfdata_name(name)))
                sources = faiss.InvertedListsPtrVector()
                for piece in pieces:
                    sources.push_back(faiss.extract_index_ivf(piece).invlists)
                lists.merge_from_multiple(sources.data(), sources.size(), False)
                ivf.replace_invlists(lists, True)
                lists.this.disown()  # the index owns the lists now
                index.ntotal = ivf.ntotal = count
            faiss.write_index(index, str(self.out / name))
            del pieces
            for path in self.pieces[shard]:
                os.unlink(path)
            files += [name, ivfdata_name(name)] if count else [name]
            total += count
            log.info("shard %s: %d vectors in on-disk lists", name, count)
        return files, total
