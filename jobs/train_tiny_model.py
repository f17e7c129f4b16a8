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
import math
import random
import re
import time
from pathlib import Path

from pipeline.selfrag.prompts import PAPER_INSTRUCTIONS, format_prompt
from pipeline.selfrag.tokens import ALL_REFLECTION_TOKENS, IRRELEVANT, RELEVANT
from pipeline.synthetic.training_data import (
    NOT_IN_LOSS, direct_example, evidence_example, label_ids, long_form_example, sample_example)
from pipeline.synthetic.world import (
    World, attribute_spec, build_world, fact_sentence, lexicon, passage_text)

REFLECTION_TOKENS = list(ALL_REFLECTION_TOKENS)
BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
BPE_VOCAB = 3000  # BPE ids before the special tokens are added
MODEL_SHAPE = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=3, num_key_value_heads=3, head_dim=64)


# ----------------------------------------------------------------------------- tokenizer

def tokenizer_corpus(seed: int = 0, examples: int = 4000) -> list[str]:
    """Texts the BPE is trained on: sampled training examples, every lexicon word and number
    (several times, so each becomes one token) and the task instructions."""
    rng = random.Random(seed)
    # split at the special tokens, as the tokenizer does before pre-tokenizing
    special = re.compile("|".join(re.escape(t) for t in REFLECTION_TOKENS + [BOS, EOS]))
    texts = [piece for _ in range(examples) for piece in special.split(sample_example(rng).text) if piece]
    words = lexicon().words() + [v for pool in lexicon().pools.values() for v in pool if v.isdigit()]
    texts += [" ".join([w] * 8) for w in words] + [" ".join(str(n) for n in range(100))] * 8
    texts += [format_prompt(t) for t in PAPER_INSTRUCTIONS.values()] + ["A: B: C: D: true false"]
    return texts


def build_tokenizer(seed: int = 0):
    """Byte-level BPE (a space is prefixed to every piece, so a word reads the same at the
    start of a piece and mid-sentence) wrapped as ``PreTrainedTokenizerFast``; prepends ``<s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=[UNK, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(seed), trainer=trainer)
    tok.add_special_tokens(REFLECTION_TOKENS + [PAD])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=REFLECTION_TOKENS, clean_up_tokenization_spaces=False,
        model_max_length=2048)
    check_tokenizer(fast)
    return fast


def check_tokenizer(tok) -> None:
    """Raise ValueError unless every lexicon word is one token and the reflection tokens are
    distinct single ids that round-trip."""
    words = lexicon().words() + [v for pool in lexicon().pools.values() for v in pool]
    split = [w for w in words if len(tok(f"is {w}.", add_special_tokens=False).input_ids) != 3]
    if split:
        raise ValueError(f"{len(split)} lexicon words are not single tokens, e.g. {split[:5]}")
    ids = [tok.convert_tokens_to_ids(t) for t in REFLECTION_TOKENS]
    if tok.unk_token_id in ids or len(set(ids)) != len(ids):
        raise ValueError(f"reflection tokens are not distinct known ids: {ids}")
    text = "".join(REFLECTION_TOKENS)
    if tok.decode(tok(text, add_special_tokens=False).input_ids) != text:
        raise ValueError("reflection tokens do not round-trip")


# ----------------------------------------------------------------------------- model

def build_model(tok, seed: int):
    """A small Llama causal LM sized to the tokenizer (tied embeddings, float32)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=-(-len(tok) // 8) * 8, max_position_embeddings=1024, rms_norm_eps=1e-6,
        initializer_range=0.02, tie_word_embeddings=True, dtype="float32",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        architectures=["LlamaForCausalLM"], **MODEL_SHAPE)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model


def collate(tok, examples) -> tuple:
    """Right-padded (input_ids, attention_mask, labels) tensors for a list of examples."""
    import torch

    pairs = [label_ids(tok, ex) for ex in examples]
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), width), tok.pad_token_id)
    labels = torch.full((len(pairs), width), NOT_IN_LOSS)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (x, y) in enumerate(pairs):
        ids[row, :len(x)], labels[row, :len(y)], mask[row, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, mask, labels


def loss_on_targets(model, ids, mask, labels, weighted: dict[int, float] | None = None):
    """Cross-entropy of next-token prediction, with the LM head applied only where a label
    counts (most positions are prompt or paragraph: skipping them saves most of the head).
    ``weighted`` gives some target ids a larger weight (the one relevance token per example
    would otherwise be a small share of the loss)."""
    import torch
    import torch.nn.functional as F

    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != NOT_IN_LOSS
    logits, wanted = model.lm_head(hidden[keep]), targets[keep]
    losses = F.cross_entropy(logits, wanted, reduction="none")
    weights = torch.ones_like(losses)
    for token_id, weight in (weighted or {}).items():
        weights[wanted == token_id] = weight
    return (losses * weights).sum() / weights.sum()


# ----------------------------------------------------------------------------- held-out checks

def probe_examples(world: World, rng: random.Random, n: int = 120) -> dict[str, list]:
    """Held-out probes on the demo world: gold passage, another entity's passage, a passage
    whose asked value is swapped (counterfactual), and no-knowledge questions."""
    questions = rng.sample(world.questions(split="heldout", kind="knowledge"), n)
    by_id = {e.id: e for e in world.entities}
    probes: dict[str, list] = {"gold": [], "unrelated": [], "counterfactual": [], "direct": []}
    for q in questions:
        entity = by_id[q["id"].split("-")[0]]
        attr, prompt = q["attribute"], format_prompt(q["instruction"])
        value = entity.attributes[attr]
        probes["gold"].append(evidence_example(prompt, entity.name, passage_text(entity), True,
                                               fact_sentence(entity, attr, value), "gold"))
        other = rng.choice([e for e in world.entities if e.id != entity.id])
        probes["unrelated"].append(evidence_example(prompt, other.name, passage_text(other), False,
                                                    "I do not know.", "unrelated"))
        swapped = rng.choice([v for v in lexicon().pools[attribute_spec(entity.type, attr).pool] if v != value])
        attrs = {**entity.attributes, attr: swapped}
        probes["counterfactual"].append(evidence_example(prompt, entity.name, passage_text(entity, attrs), True,
                                                         fact_sentence(entity, attr, swapped), "counterfactual"))
    for q in world.questions(split="heldout", kind="no_knowledge")[:n]:
        probes["direct"].append(direct_example(format_prompt(q["instruction"]), q["answers"][0], "direct"))
    probes["long_form"] = [long_form_example(rng, 0.0, "heldout") for _ in range(n // 2)]
    return probes


def probe_accuracy(model, tok, examples) -> dict[str, float]:
    """Teacher-forced shares of examples whose 1st target token (the retrieval token), 2nd
    target token (critique, or the first answer token) and every target token are right."""
    import torch

    with torch.no_grad():
        ids, mask, labels = collate(tok, examples)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        pred = model.lm_head(hidden).argmax(-1)
    targets = labels[:, 1:]
    keep = targets != NOT_IN_LOSS
    rows = torch.arange(len(examples))
    positions = [keep[r].nonzero().flatten() for r in rows]
    first = torch.stack([p[0] for p in positions])
    second = torch.stack([p[1] for p in positions])
    share = lambda ok: round(ok.float().mean().item(), 3)
    return {"first": share(pred[rows, first] == targets[rows, first]),
            "second": share(pred[rows, second] == targets[rows, second]),
            "all": share(((pred == targets) | ~keep).all(1))}


# ----------------------------------------------------------------------------- training

def train(args) -> dict:
    """Train and return the final held-out probe figures."""
    import torch

    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    tok = build_tokenizer(args.seed)
    model = build_model(tok, args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"tokenizer: {len(tok)} ids; model: {params / 1e6:.2f}M parameters", flush=True)
    probes = probe_examples(build_world(seed=0), random.Random(1))
    critique_weights = {tok.convert_tokens_to_ids(t): args.critique_weight for t in (RELEVANT, IRRELEVANT)}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = min(200, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    start, running, history = time.time(), None, []
    for step in range(1, args.steps + 1):
        # copy curriculum: one-sentence passages from 80% down to 15% over the first third
        one_fact = max(0.15, 0.8 - 0.65 * step / (args.steps / 3))
        if args.long_form_every and step % args.long_form_every == 0:
            batch = [long_form_example(rng, one_fact) for _ in range(args.batch_size)]
        else:
            batch = [sample_example(rng, one_fact) for _ in range(args.batch_size)]
        model.train()
        loss = loss_on_targets(model, *collate(tok, batch), weighted=critique_weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            figures = {k: probe_accuracy(model, tok, v) for k, v in probes.items()}
            history.append({"step": step, "loss": round(running, 4), **figures})
            print(f"step {step}/{args.steps}  loss {running:.4f}  {time.time() - start:.0f}s  "
                  + "  ".join(f"{k} {v['first']:.2f}/{v['second']:.2f}/{v['all']:.2f}" for k, v in figures.items()),
                  flush=True)
    model.eval()
    minutes = (time.time() - start) / 60
    write_model(tok, model, args, params, minutes, history[-1])
    return {"minutes": round(minutes, 1), "params": params, **history[-1]}


MODEL_CARD = """# tiny-selfrag

A {params:.2f}M-parameter Llama-architecture causal LM ({layers} layers, hidden {hidden}, {heads}
attention heads of 64, tied embeddings, float32) with a {vocab}-id byte-level BPE tokenizer
that has the 15 Self-RAG reflection tokens as special tokens. It was trained in this
repository, on CPU, to behave like Self-RAG inside the synthetic world of
`pipeline/synthetic/world.py`: it asks for retrieval for questions about invented entities,
judges a passage `[Relevant]` or `[Irrelevant]`, copies the answer from a relevant passage
and marks it `[Fully supported]`, and answers greetings, small sums and repeat-a-word
requests directly. Asked (task `asqa`) for two facts about an entity, it answers in two
segments and asks for retrieval again between them, so that long-form tree decoding goes to
depth 2. It knows nothing of the real world.

Made by (about {minutes:.0f} minutes on a 2-core CPU machine):

    python -m jobs.train_tiny_model --steps {steps} --seed {seed} --critique-weight {critique_weight} --long-form-every {long_form_every}

Training: {steps} steps of {batch} examples, AdamW, learning rate {lr} (cosine), the relevance
token's loss weighted {critique_weight}x; every example is drawn
fresh (a random entity from the lexicon with random attribute values), so answers can only be
copied from the passage, never memorised. The loss covers neither the prompt nor the paragraph.

Teacher-forced checks on the demo world's held-out questions at the end of training
(shares with the first target token right / the second / every one): {figures}

End-to-end figures (vLLM, the demo index, the held-out split) come from `make eval`.
"""


def write_model(tok, model, args, params: int, minutes: float, figures: dict) -> None:
    """Save weights, tokenizer (loadable by transformers and vLLM) and the model card."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    model.save_pretrained(out)
    (out / "model.safetensors").chmod(0o644)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # a name transformers 4.x knows too
    config["additional_special_tokens"] = config.pop("extra_special_tokens", REFLECTION_TOKENS)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
               "additional_special_tokens": REFLECTION_TOKENS}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    shape = model.config
    (out / "README.md").write_text(MODEL_CARD.format(
        params=params / 1e6, layers=shape.num_hidden_layers, hidden=shape.hidden_size,
        heads=shape.num_attention_heads, vocab=len(tok), minutes=minutes, steps=args.steps,
        seed=args.seed, batch=args.batch_size, lr=args.lr, critique_weight=args.critique_weight,
        long_form_every=args.long_form_every, figures=json.dumps({k: v for k, v in figures.items() if k != "step"})))


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
