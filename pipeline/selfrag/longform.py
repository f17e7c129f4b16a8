"""Long-form Self-RAG: segment-level tree decoding (docs/algorithm.md, section 4) as a step-wise
state machine over plain data.

One ``LongFormTree`` per row. It never calls an engine or a retriever itself; the caller
batches the work of many trees, one retrieval call and one engine call per depth::

    tree = LongFormTree(prompt, prompt_ids, question, ids, params, tokens, tokenizer.decode, retrieve=decision)
    while not tree.done:
        passages = {key: search(query) for key, query in tree.pending_queries()}
        requests = tree.requests(passages)   # GenerationRequest(key, node, prompt, prompt_ids, passage)
        tree.advance([generate(r.prompt_ids) for r in requests])   # a Continuation or an error string
    result = tree.result()                            # LongFormResult

The algorithm and the choices made here:

- **Root.** The caller makes the retrieval decision (section 3's rule). No retrieval: one
  generation from ``prompt + "[No Retrieval]"`` is the whole answer, a leaf at depth 1 with no
  passage; it is not cut at retrieval points (the page says "generate the whole answer and
  stop"). Its critique scores are computed the same way but nothing competes with it.
- **Depths.** ``max_depth`` is the reference's T: segments are generated at depths
  1..T-1 (the reference loops ``while curr_depth < max_depth``), so a path has at most T-1
  segments; paths still asking for retrieval after depth T-1 count as finished.
- **Expansion.** Every open node gets one generation per passage (the first ``top_k``):
  ``evidence_prompt(context, title, text)`` with ``context = prompt + the path's segments``,
  reflection tokens kept, earlier passages not repeated (the paper's Algorithm 1). As token
  ids, a segment is carried over as the ids the model generated (never re-tokenized from
  text), so the model's own reflection tokens stay special and its text stays text.
  ``retrieve_per_segment`` (default on, the paper) asks for passages for every open node with
  query ``question + " " + the node's cleaned segment`` (the root's query is the question);
  off, only the root retrieves and its passages are reused at every depth (the reference).
- **Segments.** A generated position is a retrieval point when its sampled token is
  ``[Retrieval]``, or ``[No Retrieval]`` with
  ``(P[Retrieval] + P[Continue to Use Evidence]) / (P[Retrieval] + P[No Retrieval]) > threshold``
  (0 when the denominator is 0; a token the engine did not return counts as 0). The child's
  segment is its tokens before the first retrieval point, decoded with reflection tokens
  kept; such a child is expanded at the next depth. A child with no retrieval point is a leaf.
- **Scores.** Section 3's formulas on the segment's part of the continuation: s_rel at
  position 0, s_sup / s_use at the first ISSUP / utility token *inside the segment* (a
  judgement after the retrieval point belongs to text that is regenerated). Utility is read
  from the utility tokens (the reference reads the ISSUP group there, so its s_use is always
  0). ``seq`` is the whole continuation's mean token logprob: the engine returns logprobs of
  the reflection tokens only, so a prefix's own sum is unknown. Unlike the reference,
  ``use_seqscore`` is honoured. Child score = step score x parent score (root = 1), as the
  page says (a step score can be negative through s_use; the product is taken as it is).
- **Beam.** The top ``beam_width`` children across all parents of a depth are kept (leaves take
  slots too, as in the reference); ties keep the earlier child (parents in beam order, then
  passages in rank order).
- **Errors.** A request may come back as an error string (e.g. "prompt too long"): that child
  is not created. A node none of whose requests succeeded (or that got no passages) stops: its
  path is finished as it stands and competes with the others; ``stop_reason`` records the first
  such stop, e.g. ``"prompt too long at depth 2"``.
- **Result.** The best-scoring finished path of any depth (earliest on ties), not only the
  deepest level as in the reference. Segments are cleaned (reflection tokens, markup, ``</s>``
  stripped); empty segments, segments whose text was already kept, and with ``ignore_cont``
  segments whose first ISSUP token is ``[No support / Contradictory]`` are dropped. Each kept
  segment with a passage is cited as ``[n]``: passages are numbered in the order they are
  first cited (the same passage keeps its number), so ``[n]`` is ``docs[n-1]`` with no gaps.
  The citation goes before the segment's final ``.``/``!``/``?`` (ALCE style, as the reference
  writes ``"... [1]."``), else at its end. The reference numbers by position in the unfiltered
  path, so its citations drift after a dropped segment; here they do not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, Union

from .prompts import PromptTokens, evidence_prompt, no_evidence_prompt
from .scoring import (
    Continuation,
    Logprobs,
    ScoreWeights,
    final_score,
    prob,
    relevance_score,
    sequence_score,
    support_score,
    utility_score,
)
from .selection import clean_answer as clean
from .tokens import CONTINUE_EVIDENCE, ISSUP_GROUP, NO_RETRIEVAL, NO_SUPPORT, RETRIEVAL, ReflectionIds

Decode = Callable[[Sequence[int]], str]
StepResult = Union[Continuation, str]


@dataclass(frozen=True)
class LongFormParams:
    """Tree-decoding parameters (paper defaults: beam 2, T 7, threshold 0.2, k 5)."""

    beam_width: int = 2
    max_depth: int = 7
    threshold: float = 0.2
    weights: ScoreWeights = field(default_factory=ScoreWeights)
    ignore_cont: bool = False
    retrieve_per_segment: bool = True
    top_k: int = 5

    def __post_init__(self):
        if self.beam_width < 1 or self.top_k < 1:
            raise ValueError("beam_width and top_k must be at least 1")
        if self.max_depth < 2:
            raise ValueError("max_depth is the reference's T (segments at depths 1..T-1): it must be at least 2")


@dataclass(frozen=True)
class GenerationRequest:
    """One generation the tree needs: ``key`` is unique in the tree, ``node`` the parent's key."""

    key: str
    node: str
    prompt: str  #: readable form
    prompt_ids: list[int]  #: what the engine is sent
    passage: dict | None


@dataclass
class LongFormResult:
    """The chosen path.

    ``segments``: the kept segments, each ``{text, raw, passage_id, citation, s_rel, s_sup, s_use,
    score (step), path_score, depth, continuation (the whole generation the
    segment was cut from, for auditing)}``; ``citations``: per kept segment, its ``n`` or None;
    ``docs``: the cited passages, ``docs[n-1]`` for ``[n]``; ``raw``: the path's segments with
    reflection tokens; ``score``: the path's score; ``depth``: its number of segments.
    """

    text: str
    raw: str
    segments: list[dict]
    citations: list[int | None]
    docs: list[dict]
    score: float
    depth: int
    retrieved: bool
    stop_reason: str | None


@dataclass(eq=False)
class _Node:
    key: str
    depth: int
    parent: "_Node | None"
    context: str  # prompt + the path's segments up to and including this one (readable)
    context_ids: list[int]  # the same as token ids
    raw: str = ""  # this segment, reflection tokens kept
    token_ids: list[int] = field(default_factory=list)
    passage: dict | None = None
    s_rel: float = 0.0
    s_sup: float = 0.0
    s_use: float = 0.0
    step: float = 1.0
    score: float = 1.0
    wants_retrieval: bool = True
    continuation: Continuation | None = None  # the whole generation this segment was cut from


def redecide_probability(position: Logprobs, ids: ReflectionIds) -> float:
    """(P[Retrieval] + P[Continue to Use Evidence]) / (P[Retrieval] + P[No Retrieval]) at one position."""
    p_r, p_n = prob(position, ids[RETRIEVAL]), prob(position, ids[NO_RETRIEVAL])
    p_c = prob(position, ids[CONTINUE_EVIDENCE])
    return (p_r + p_c) / (p_r + p_n) if p_r + p_n > 0 else 0.0


def retrieval_point(cont: Continuation, ids: ReflectionIds, threshold: float) -> int | None:
    """The first generated position that asks for retrieval (a sampled ``[Retrieval]``, or a
    ``[No Retrieval]`` re-decided above ``threshold``); None if there is none."""
    for i, tid in enumerate(cont.token_ids):
        if tid == ids[RETRIEVAL]:
            return i
        if tid == ids[NO_RETRIEVAL] and i < len(cont.logprobs):
            if redecide_probability(cont.logprobs[i], ids) > threshold:
                return i
    return None


def cite(text: str, n: int) -> str:
    """``text`` with `` [n]`` before its final sentence punctuation, or at its end."""
    if text and text[-1] in ".!?":
        return f"{text[:-1]} [{n}]{text[-1]}"
    return f"{text} [{n}]"


def _passage_key(passage: dict):
    pid = passage.get("id")
    return ("id", pid) if pid is not None else ("text", passage.get("title"), passage.get("text"))


class LongFormTree:
    """The decoding tree of one row, advanced one depth at a time by the caller."""

    def __init__(self, prompt: str, prompt_ids: Sequence[int], question: str, ids: ReflectionIds,
                 params: LongFormParams, tokens: PromptTokens, decode: Decode, retrieve: bool):
        """Start a tree from a prompt (text and token ids); ``retrieve`` is the root's retrieval
        decision, ``tokens`` builds evidence prompts as ids, ``decode`` turns token ids into text
        with the reflection tokens kept."""
        self.prompt, self.question, self.ids, self.params, self.decode = prompt, question, ids, params, decode
        self.tokens, self.retrieve = tokens, retrieve
        self.root = _Node("root", 0, None, context=prompt, context_ids=list(prompt_ids))
        self.depth = 1  #: the depth whose segments the next requests generate
        self.stop_reason: str | None = None
        self.errors: list[str] = []  #: every failed request, "message at depth d"
        self.requests_per_depth: list[int] = []  #: generations consumed at depths 1, 2, ...
        self.queries_per_depth: list[int] = []  #: nodes that took fresh passages at depths 1, 2, ...
        self._open: list[_Node] = [self.root]
        self._finished: list[_Node] = []
        self._issued: list[tuple[_Node, dict | None, GenerationRequest]] = []
        self._root_passages: list[dict] = []
        self._count = 0

    @property
    def done(self) -> bool:
        """True once no path is left to expand; then ``result()`` may be called."""
        return not self._open

    @property
    def last_depth(self) -> int:
        """The deepest depth at which segments are generated."""
        return self.params.max_depth - 1 if self.retrieve else 1

    def _fresh_passages(self) -> bool:
        return self.retrieve and (self.depth == 1 or self.params.retrieve_per_segment)

    def pending_queries(self) -> list[tuple[str, str]]:
        """``(node key, query)`` for each open node that needs passages at this depth."""
        if self.done or not self._fresh_passages():
            return []
        return [(n.key, self.question if n is self.root else f"{self.question} {clean(n.raw)}".strip())
                for n in self._open]

    def requests(self, passages_by_node: Mapping[str, Sequence[dict]] | None = None) -> list[GenerationRequest]:
        """The generations of this depth, one per (open node, passage), in beam then passage
        order. ``passages_by_node`` answers ``pending_queries()`` (passages: dicts with id,
        title, text; best first); a node with no passages stops. Calling again rebuilds."""
        self._issued = []
        if self.done:
            return []
        if not self.retrieve:
            req = GenerationRequest("root/none", self.root.key, no_evidence_prompt(self.prompt),
                                    self.tokens.no_evidence(self.root.context_ids), None)
            self._issued.append((self.root, None, req))
            return [req]
        fresh = self._fresh_passages()
        for node in self._open:
            if fresh:
                passages = list((passages_by_node or {}).get(node.key) or [])[: self.params.top_k]
            else:
                passages = self._root_passages
            if node is self.root:
                self._root_passages = passages
            for j, p in enumerate(passages):
                title, text = p.get("title"), p.get("text")
                req = GenerationRequest(f"{node.key}/{j}", node.key, evidence_prompt(node.context, title, text),
                                        self.tokens.evidence(node.context_ids, title, text), p)
                self._issued.append((node, p, req))
        return [req for *_, req in self._issued]

    def advance(self, results: Sequence[StepResult]) -> None:
        """Consume one result per request of ``requests()`` (a Continuation or an error
        string), score the children, keep the beam and move to the next depth."""
        if self.done:
            raise RuntimeError("the tree is already finished")
        if len(results) != len(self._issued):
            raise ValueError(f"expected {len(self._issued)} results (one per request), got {len(results)}")
        self.requests_per_depth.append(len(self._issued))
        if self._fresh_passages():
            self.queries_per_depth.append(len(self._open))
        children, grown, failed = [], set(), {}
        for (node, passage, _), res in zip(self._issued, results):
            if isinstance(res, Continuation):
                children.append(self._child(node, passage, res))
                grown.add(id(node))
            else:
                message = f"{res} at depth {self.depth}"
                self.errors.append(message)
                failed.setdefault(id(node), message)
        for node in self._open:
            if id(node) not in grown:  # this path stops here, as it stands
                self.stop_reason = self.stop_reason or failed.get(id(node), f"no passages at depth {self.depth}")
                self._finished.append(node)
        kept = sorted(children, key=lambda c: -c.score)[: self.params.beam_width]  # stable: ties keep order
        self._open = [c for c in kept if c.wants_retrieval and self.depth < self.last_depth]
        self._finished += [c for c in kept if not (c.wants_retrieval and self.depth < self.last_depth)]
        self._issued = []
        self.depth += 1

    def _child(self, parent: _Node, passage: dict | None, cont: Continuation) -> _Node:
        cut = retrieval_point(cont, self.ids, self.params.threshold) if self.retrieve else None
        end = len(cont.token_ids) if cut is None else cut
        segment = Continuation(token_ids=list(cont.token_ids[:end]), logprobs=list(cont.logprobs[:end]))
        s_rel = relevance_score(cont, self.ids)  # position 0 starts the segment
        s_sup, s_use = support_score(segment, self.ids), utility_score(segment, self.ids)
        step = final_score(s_rel, s_sup, s_use, sequence_score(cont), self.params.weights)
        raw = self.decode(segment.token_ids)
        self._count += 1
        return _Node(f"d{self.depth}n{self._count}", self.depth, parent, parent.context + raw,
                     parent.context_ids + segment.token_ids, raw, segment.token_ids, passage, s_rel, s_sup, s_use,
                     step, step * parent.score, wants_retrieval=cut is not None, continuation=cont)

    def _unsupported(self, node: _Node) -> bool:
        issup = set(self.ids.ids(ISSUP_GROUP))
        first = next((t for t in node.token_ids if t in issup), None)
        return first == self.ids[NO_SUPPORT]

    def result(self) -> LongFormResult:
        """The best finished path with its cleaned, cited text (see the module docstring)."""
        if not self.done:
            raise RuntimeError("the tree is not finished")
        best = self._finished[0]
        for node in self._finished[1:]:
            if node.score > best.score:
                best = node
        path, node = [], best
        while node.parent is not None:
            path.append(node)
            node = node.parent
        path.reverse()

        segments, texts, citations, docs, numbers = [], [], [], [], {}
        for node in path:
            text = clean(node.raw)
            if not text or text in texts or (self.params.ignore_cont and self._unsupported(node)):
                continue
            n = None
            if node.passage is not None:
                key = _passage_key(node.passage)
                if key not in numbers:
                    docs.append(node.passage)
                    numbers[key] = len(docs)
                n = numbers[key]
            texts.append(text)
            citations.append(n)
            segments.append({"text": text, "raw": node.raw, "passage_id": None if node.passage is None else node.passage.get("id"),
                             "citation": n, "s_rel": node.s_rel, "s_sup": node.s_sup, "s_use": node.s_use,
                             "score": node.step, "path_score": node.score, "depth": node.depth,
                             "continuation": node.continuation})
        text = " ".join(t if n is None else cite(t, n) for t, n in zip(texts, citations))
        return LongFormResult(text=text, raw="".join(n.raw for n in path), segments=segments, citations=citations,
                              docs=docs, score=best.score, depth=len(path), retrieved=self.retrieve,
                              stop_reason=self.stop_reason)

    def stats(self) -> dict:
        """Counters for metrics: generations and retrieval queries per depth, failed requests."""
        return {"depths": len(self.requests_per_depth), "requests": sum(self.requests_per_depth),
                "requests_per_depth": list(self.requests_per_depth), "queries": sum(self.queries_per_depth),
                "queries_per_depth": list(self.queries_per_depth), "errors": len(self.errors)}
