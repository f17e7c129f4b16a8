"""The tiny model (models/tiny-selfrag): a small Llama sized to its tokenizer, the batches and
loss it is trained with, and how it is saved with its model card (``python -m
jobs.train_tiny_model``; the training loop: ``pipeline.synthetic.tiny_training``)."""

from __future__ import annotations

import json
from pathlib import Path

from .tiny_tokenizer import BOS, EOS, PAD, REFLECTION_TOKENS, UNK
from .training_data import NOT_IN_LOSS, label_ids

MODEL_SHAPE = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=3, num_key_value_heads=3, head_dim=64)


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
