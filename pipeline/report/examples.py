"""A few annotated rows, printed for a person after a run (what the model decided and said)."""

from __future__ import annotations

import textwrap

#: Columns the examples read.
COLUMNS = ("id", "retrieved", "retrieval_prob", "passages", "candidates", "best_passage_id", "answer",
           "segments", "docs", "error", "path_depth")


def pick(rows: list[dict], n: int) -> list[dict]:
    """Up to ``n`` rows that show the most: a long-form answer with citations first, then rows
    that retrieved and rows answered without evidence, alternating; error rows last."""
    ok = [r for r in rows if not r.get("error") and r.get("answer")]
    long_form = [r for r in ok if r.get("segments") and any(s.get("citation") for s in r["segments"])]
    retrieved = [r for r in ok if r.get("retrieved") and r.get("candidates") and r not in long_form]
    direct = [r for r in ok if r.get("retrieved") is False and r not in long_form]
    order = long_form[:1] + [r for pair in zip(retrieved, direct) for r in pair] + retrieved + direct
    out: list[dict] = []
    for r in order:
        if len(out) == n:
            break
        if all(r is not o for o in out):
            out.append(r)
    return out


def _short(text: str | None, width: int = 200) -> str:
    """One line of at most ``width`` characters, without control characters (text from the rows
    must not drive the operator's terminal, e.g. with escape sequences)."""
    printable = "".join(ch if ch.isprintable() else " " for ch in (text or ""))
    return textwrap.shorten(" ".join(printable.split()), width=width, placeholder=" ...")


def describe(row: dict, question: str) -> str:
    """Several indented lines about one annotated row."""
    prob = row.get("retrieval_prob")
    decision = ("retrieved" if row.get("retrieved") else "no retrieval") + (
        f" (P[Retrieval] {prob:.2f})" if prob is not None else "")
    lines = [f"Q: {_short(question, 160)}", f"   decision: {decision}"]
    if row.get("segments"):
        docs = row.get("docs") or []
        lines.append(f"   long-form answer, {len(row['segments'])} segment(s), path depth {row.get('path_depth')}:")
        lines.append(f"   A: {_short(row['answer'], 400)}")
        for i, doc in enumerate(docs, 1):
            lines.append(f"      [{i}] {_short(doc.get('title'), 60)}")
        return "\n".join(lines)
    best = next((c for c in row.get("candidates") or [] if c.get("passage_id") == row.get("best_passage_id")), None)
    if best is not None:
        passages = row.get("passages") or []
        ids = [p.get("id") for p in passages]
        title = passages[ids.index(best["passage_id"])].get("title") if best["passage_id"] in ids else None
        rank = ids.index(best["passage_id"]) + 1 if best["passage_id"] in ids else "?"
        lines.append(f"   chosen passage: {_short(title, 60)!r} (rank {rank} of {len(passages)}); "
                     f"s_rel {best['s_rel']:.2f}  s_sup {best['s_sup']:.2f}  s_use {best['s_use']:+.2f}  "
                     f"final {best['final']:.2f}")
    lines.append(f"   A: {_short(row['answer'])}")
    return "\n".join(lines)
