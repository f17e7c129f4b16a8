"""Write the embedded demo assets: a corpus, two query shards and a tiny Self-RAG-format model.

Usage::

    python -m jobs.make_demo_assets [--out-data data/demo] [--out-model models/tiny-selfrag]
                                    [--seed 0] [--skip-model]

Everything is derived from the synthetic world of ``pipeline.synthetic.world`` and from
``--seed``, so running the script twice writes byte-identical files. The model has random
weights: it speaks the Self-RAG token format but knows nothing; it exists to test plumbing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.selfrag.prompts import TASK_INSTRUCTIONS
from pipeline.selfrag.tokens import ALL_REFLECTION_TOKENS
from pipeline.synthetic.world import (
    Entity, World, attribute_spec, build_world, fact_sentence, passage_id)

SOURCE = "synthetic-world"
REFLECTION_TOKENS = list(ALL_REFLECTION_TOKENS)
BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
VOCAB_SIZE = 2000  # BPE vocabulary including all special tokens
# Only used as tokenizer training text.
TASK_TEXTS = [TASK_INSTRUCTIONS["fever"], TASK_INSTRUCTIONS["arc_c"]]
INITIALIZER_RANGE = 0.5  # large on purpose: peaked, prompt-dependent random predictions

PASSAGE_TYPE = pa.struct([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])
CORPUS_SCHEMA = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])
QUERY_SCHEMA = pa.schema([
    ("id", pa.string()), ("instruction", pa.string()), ("input", pa.string()),
    ("task", pa.string()), ("answers", pa.list_(pa.string())),
    ("ctxs", pa.list_(PASSAGE_TYPE)), ("source", pa.string()),
])


# ----------------------------------------------------------------------------- data

def query_row(qid: str, instruction: str, answers: list[str], *, input: str | None = None,
              task: str | None = None, ctxs: list[dict] | None = None) -> dict:
    """Return one demo query row with every column of QUERY_SCHEMA."""
    return {"id": qid, "instruction": instruction, "input": input, "task": task,
            "answers": answers, "ctxs": ctxs, "source": SOURCE}


def fever_row(rng: random.Random, world: World, entity: Entity, true: bool) -> dict:
    """A PubHealth-style row: a true or false claim about ``entity``, answer "true"/"false"."""
    attr = rng.choice(list(entity.attributes))
    value = entity.attributes[attr]
    if not true:
        pool = world.pools[attribute_spec(entity.type, attr).pool]
        value = rng.choice([v for v in pool if v != value])
    claim = fact_sentence(entity, attr, value)
    return query_row(f"fever-{entity.id}-{attr}", claim, ["true" if true else "false"],
                     task="fever")


def arc_row(rng: random.Random, world: World, entity: Entity, letter: str) -> dict:
    """An ARC-style row: a question with four lettered choices, gold at ``letter``."""
    attr = rng.choice(list(entity.attributes))
    gold = entity.attributes[attr]
    spec = attribute_spec(entity.type, attr)
    choices = rng.sample([v for v in world.pools[spec.pool] if v != gold], 3)
    choices.insert("ABCD".index(letter), gold)
    question = spec.heldout[0].format(e=entity.name)
    lines = [question] + [f"{x}: {c}" for x, c in zip("ABCD", choices)]
    return query_row(f"arc_c-{entity.id}-{attr}", "\n".join(lines), [letter], task="arc_c")


def demo_rows(world: World, seed: int = 0) -> list[dict]:
    """Pick the ~40 demo queries: held-out knowledge and no-knowledge questions, plus
    3 rows with pre-supplied ctxs, 2 ``fever`` rows, 2 ``arc_c`` rows and 1 row with input."""
    rng = random.Random(seed)
    entities = rng.sample(world.entities, 30)
    by_entity = {}
    for q in world.questions(split="heldout", kind="knowledge"):
        by_entity.setdefault(q["gold_passage_id"], []).append(q)
    picked = [rng.choice(by_entity[passage_id(e)]) for e in entities[:26]]

    rows = [query_row(q["id"], q["instruction"], q["answers"]) for q in picked[:22]]
    for q in picked[22:25]:  # pre-supplied evidence: gold passage plus an unrelated one
        gold = world.passage_by_id(q["gold_passage_id"])
        other = rng.choice([p for p in world.passages if p["id"] != gold["id"]])
        ctxs = [gold, other] if rng.random() < 0.5 else [other, gold]
        rows.append(query_row(q["id"], q["instruction"], q["answers"], ctxs=ctxs))
    q = picked[25]
    rows.append(query_row(q["id"], "Answer the following question.", q["answers"],
                          input=q["instruction"]))

    no_knowledge = world.questions(split="heldout", kind="no_knowledge")
    for prefix, count in (("greet-", 2), ("add-", 4), ("repeat-", 4)):
        group = [x for x in no_knowledge if x["id"].startswith(prefix)]
        rows += [query_row(x["id"], x["instruction"], x["answers"])
                 for x in rng.sample(group, count)]

    rows += [fever_row(rng, world, entities[26], True), fever_row(rng, world, entities[27], False)]
    rows += [arc_row(rng, world, entities[28], "B"), arc_row(rng, world, entities[29], "D")]
    rng.shuffle(rows)
    return rows


def write_demo_data(world: World, out_data: Path, seed: int = 0) -> list[Path]:
    """Write ``corpus.parquet`` and two query shards under ``out_data``; return the paths."""
    (out_data / "queries").mkdir(parents=True, exist_ok=True)
    corpus = out_data / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(world.passages, schema=CORPUS_SCHEMA), corpus)
    rows = demo_rows(world, seed)
    half = len(rows) // 2
    paths = [corpus]
    for i, shard in enumerate((rows[:half], rows[half:])):
        path = out_data / "queries" / f"part-{i:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(shard, schema=QUERY_SCHEMA), path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- tokenizer

def prompt(instruction: str, input: str | None = None) -> str:
    """Format a Self-RAG prompt (SELF_RAG.md section 2)."""
    if input:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def training_text(world: World) -> list[str]:
    """Return the texts the BPE tokenizer is trained on: passages, every question formatted
    as a prompt with its answer, and the task instructions."""
    texts = [f"{p['title']}\n{p['text']}" for p in world.passages]
    texts += [prompt(q["instruction"]) + " ".join(q["answers"]) for q in world.all_questions]
    texts += [prompt(text, "x") for text in TASK_TEXTS]
    texts += ["A: B: C: D: true false"] + [str(n) for n in range(100)]
    return texts


def build_tokenizer(world: World):
    """Train a byte-level BPE (``VOCAB_SIZE`` ids) on the world's text and wrap it as a
    ``PreTrainedTokenizerFast`` that prepends ``<s>``, with the 15 reflection tokens and
    ``<pad>`` added as special tokens after the BPE vocabulary (as in the released models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(REFLECTION_TOKENS) - 1, special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_text(world), trainer=trainer)
    tok.add_special_tokens(REFLECTION_TOKENS + [PAD])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=REFLECTION_TOKENS, clean_up_tokenization_spaces=False,
        model_max_length=2048, add_bos_token=True, add_eos_token=False)


def check_tokenizer(tok) -> None:
    """Raise ValueError unless the reflection tokens are single ids, ``<s>`` is prepended
    and decoding with special tokens kept gives the reflection strings back."""
    ids = [tok.convert_tokens_to_ids(t) for t in REFLECTION_TOKENS]
    if tok.unk_token_id in ids or len(set(ids)) != len(ids):
        raise ValueError(f"reflection tokens are not distinct known ids: {ids}")
    enc = tok("### Response:\n[Retrieval]<paragraph>X\nY</paragraph>").input_ids
    wanted = [tok.bos_token_id] + [tok.convert_tokens_to_ids(t)
                                   for t in ("[Retrieval]", "<paragraph>", "</paragraph>")]
    if enc[0] != tok.bos_token_id or not set(wanted) <= set(enc):
        raise ValueError(f"bad encoding of reflection tokens: {enc}")
    text = "".join(REFLECTION_TOKENS)
    enc = tok(text, add_special_tokens=False).input_ids
    if enc != ids or tok.decode(enc, skip_special_tokens=False) != text:
        raise ValueError(f"reflection tokens do not round-trip: {enc}")


# ----------------------------------------------------------------------------- model

def build_model(tok, seed: int = 0):
    """Return a 2-layer Llama causal LM (hidden 128, 2 heads of 64) with random weights
    drawn after ``torch.manual_seed(seed)``, sized to the tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    vocab = -(-len(tok) // 8) * 8  # round up to a multiple of 8
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=2048, initializer_range=INITIALIZER_RANGE,
        rms_norm_eps=1e-6, tie_word_embeddings=False, dtype="float32",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, architectures=["LlamaForCausalLM"])
    if vocab != len(tok):
        config.vocab_padding_note = (
            f"vocab_size {vocab} is len(tokenizer) {len(tok)} rounded up to a multiple of 8")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    return model


def retrieval_ratios(model, tok, prompts: list[str]) -> list[float]:
    """Return p([Retrieval]) / (p([Retrieval]) + p([No Retrieval])) at the first position."""
    import torch

    r, n = tok.convert_tokens_to_ids("[Retrieval]"), tok.convert_tokens_to_ids("[No Retrieval]")
    ratios = []
    with torch.no_grad():
        for text in prompts:
            logits = model(**tok(text, return_tensors="pt")).logits[0, -1]
            ratios.append(torch.sigmoid(logits[r] - logits[n]).item())
    return ratios


def greedy_min_gap(model, tok, prompts: list[str], steps: int = 20) -> float:
    """Return the smallest top-1 minus top-2 logit gap seen during greedy generation."""
    import torch

    gap = float("inf")
    with torch.no_grad():
        for text in prompts:
            ids = tok(text, return_tensors="pt").input_ids
            for _ in range(steps):
                top = model(input_ids=ids).logits[0, -1].topk(2)
                gap = min(gap, (top.values[0] - top.values[1]).item())
                ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
    return gap


MODEL_CARD = """# tiny-selfrag (random weights, for plumbing tests only)

A 2-layer Llama-architecture causal LM (hidden 128, 2 attention heads of 64, about {params}
parameters, float32) with **random weights** and a {vocab}-id byte-level BPE tokenizer that
has the 15 Self-RAG reflection tokens (`[Retrieval]`, `[Relevant]`, `[Utility:5]`,
`<paragraph>`, ...) as special tokens. It speaks the Self-RAG token format but knows
nothing: its answers are noise. Use it to test pipelines offline (transformers or vLLM).

Made, deterministically, by:

    python -m jobs.make_demo_assets --seed {seed}

The tokenizer is trained on the synthetic world of `pipeline/synthetic/world.py`; weights
are drawn after `torch.manual_seed({seed})` with `initializer_range={init}` so next-token
distributions are peaked and differ between prompts.

Special tokens: {ids}.

vLLM's `dtype="auto"` downcasts float32 checkpoints to 16 bits; pass `dtype="float32"` when
its outputs must match transformers' (some greedy steps have top-2 logit gaps below 0.01).
"""


def write_model(tok, model, out_model: Path, seed: int) -> list[Path]:
    """Save tokenizer, model (safetensors), generation config and model card."""
    out_model.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_model)
    model.save_pretrained(out_model)
    config_path = out_model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # Names that transformers 4.x understands too (5.x reads both).
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["additional_special_tokens"] = config.pop("extra_special_tokens", REFLECTION_TOKENS)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
               "additional_special_tokens": REFLECTION_TOKENS}
    (out_model / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out_model / "model.safetensors").chmod(0o644)
    params = sum(p.numel() for p in model.parameters())
    (out_model / "README.md").write_text(MODEL_CARD.format(
        params=f"{params / 1e6:.2f}M", vocab=len(tok), seed=seed, init=INITIALIZER_RANGE,
        ids=", ".join(f"`{t}` {tok.convert_tokens_to_ids(t)}"
                      for t in [BOS, EOS, UNK, PAD] + REFLECTION_TOKENS)))
    return sorted(p for p in out_model.iterdir() if p.is_file())


# ----------------------------------------------------------------------------- main

def describe(paths: list[Path]) -> None:
    """Print each written file with its size and a short sha256."""
    for path in paths:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        print(f"wrote {path}  {path.stat().st_size:>9,d} bytes  sha256 {digest}")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, write the demo data and (unless ``--skip-model``) the tiny model."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-data", type=Path, default=Path("data/demo"))
    parser.add_argument("--out-model", type=Path, default=Path("models/tiny-selfrag"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-model", action="store_true", help="write only the data")
    args = parser.parse_args(argv)

    world = build_world(seed=args.seed)
    describe(write_demo_data(world, args.out_data, args.seed))
    if args.skip_model:
        return
    tok = build_tokenizer(world)
    check_tokenizer(tok)
    model = build_model(tok, args.seed)
    describe(write_model(tok, model, args.out_model, args.seed))

    rows = [r for r in demo_rows(world, args.seed) if r["task"] is None][:10]
    prompts = [prompt(r["instruction"], r["input"]) for r in rows]
    print("p([Retrieval]) / (p([Retrieval]) + p([No Retrieval])) at the first position:")
    for r, ratio in zip(rows, retrieval_ratios(model, tok, prompts)):
        print(f"  {ratio:.3f}  {r['instruction'][:60]!r}")
    gap = greedy_min_gap(model, tok, [p + "[No Retrieval]" for p in prompts[:3]])
    print(f"smallest top-1/top-2 logit gap in 3 greedy generations of 20 tokens: {gap:.3f}")


if __name__ == "__main__":
    main()
