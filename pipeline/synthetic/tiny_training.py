"""Training of the tiny model on CPU (``python -m jobs.train_tiny_model``): examples drawn fresh
at every step, a copy curriculum, long-form batches apart, and teacher-forced checks on the
held-out split of the demo world."""

from __future__ import annotations

import math
import random
import time

from ..selfrag.prompts import format_prompt
from ..selfrag.tokens import IRRELEVANT, RELEVANT
from .tiny_model import build_model, collate, loss_on_targets, write_model
from .tiny_tokenizer import build_tokenizer
from .training_data import (
    NOT_IN_LOSS, direct_example, evidence_example, long_form_example, sample_example)
from .world import World, attribute_spec, build_world, fact_sentence, lexicon, passage_text

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
