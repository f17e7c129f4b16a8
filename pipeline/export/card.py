"""The dataset card: ``README.md`` in the Hugging Face layout (YAML header with the configs and
their data files, then prose), with the source run, the model, the config hash, the filters'
counts, the control strings stripped from text (and how many records that changed) and the
label distributions. The license is left for the user."""

from __future__ import annotations

import json

from .convert import KINDS
from .filters import FILTER_ORDER
from .records import CONTINUATION_CONTROL_STRINGS, CONTROL_STRINGS

DESCRIPTIONS = {
    "generator": "Self-RAG generator data in the format of `selfrag/selfrag_train_data` "
                 "(`instruction`, `input`, `output`, `id`, `dataset_name`); `output` interleaves the "
                 "reflection tokens and the evidence as the model produced them (control strings stripped from the "
                 "text: see below).",
    "critic": "Critic data: one example per judged aspect (`retrieval`, `isrel`, `issup`, `isuse`) with "
              "the label the model chose, its probability within its token group (null where the run did not "
              "record it) and the run's score.",
    "chat": "Chat SFT data: `messages` (user, assistant) with the answer citing its passages as `[n]` "
            "(`references[n-1]`).",
}


def filter_table(counts: dict) -> list[dict]:
    """Rows before, dropped by and after each filter, in the order they apply."""
    table, before = [], counts.get("rows_in", 0)
    for name in FILTER_ORDER:
        dropped = counts.get(f"dropped_{name}", 0)
        table.append({"filter": name, "before": before, "dropped": dropped, "after": before - dropped})
        before -= dropped
    return table


def control_strings_section(counts: dict) -> list[str]:
    """What was stripped from the records' text, exactly, and how many records of each dataset
    it changed."""
    def listed(strings):
        return ", ".join(f"`{t}`" for t in strings)
    kept = [t for t in CONTROL_STRINGS if t not in CONTINUATION_CONTROL_STRINGS]
    return ["## Control strings stripped from text", "",
            "Questions, inputs, passage titles and texts and the model's answers are text, but a trainer "
            "tokenizes these strings with special-token parsing on (and may cut prompts at the template's "
            "markers), so a string that spells a control token would act as one: a passage holding "
            "`</paragraph>` would close its paragraph early and put what follows in the loss. Such strings "
            "are stripped (removed, not escaped), repeatedly until none is left:", "",
            f"- from questions, inputs, titles, passages and answers, wherever a record holds them: "
            f"{listed(CONTROL_STRINGS)};",
            f"- from the model's raw continuations in the generator `output`: {listed(CONTINUATION_CONTROL_STRINGS)} "
            f"(the reflection tokens it generated, {listed(kept)}, are its labels and stay; the `<s>`/`</s>` it "
            "generated are left out of every `output` and not counted below).", "",
            "Records changed by stripping: " + ", ".join(f"{kind} {counts.get(f'scrubbed_{kind}', 0)}" for kind in KINDS)
            + ".", ""]


def yaml_header(splits: dict[str, list[str]], formats: list[str]) -> str:
    """The card's YAML: license left empty, and one config per dataset with its splits' files."""
    fmt = "parquet" if "parquet" in formats else "jsonl"
    lines = ["---", "license: ''  # set the license of your data (and check the source data's terms)",
             "task_categories:", "- text-generation", "tags:", "- self-rag", "- synthetic", "configs:"]
    for kind in KINDS:
        if not splits.get(kind):
            continue
        lines += [f"- config_name: {kind}", "  data_files:"]
        for split in splits[kind]:
            lines += [f"  - split: {split}", f"    path: {kind}/{split}/*.{fmt}"]
    return "\n".join(lines + ["---", ""])


def render_card(summary: dict) -> str:
    """The card's text from the export summary (``source``, ``counts``, ``labels``, ``splits``,
    ``config``)."""
    src, counts = summary["source"], summary["counts"]
    out = [yaml_header(summary["splits"], summary["config"]["formats"]), "# Self-RAG training data", "",
           f"Exported from the annotated run `{src['run']}` (run id `{src.get('run_id')}`) by "
           "`python -m jobs.export_dataset`.", "",
           f"- model: `{src.get('model')}`", f"- config hash: `{src.get('config_hash')}`",
           f"- rows in the run: {counts.get('rows_in', 0)}; exported: {counts.get('rows_out', 0)} "
           f"(train {counts.get('rows_train', 0)}, validation {counts.get('rows_validation', 0)}, "
           f"validation fraction {summary['config']['validation_fraction']}, split by a hash of the id)",
           f"- rows answered without evidence because the run forced it (never mode): "
           f"{counts.get('never_mode_rows', 0)}, exported {counts.get('never_mode_rows_exported', 0)} "
           f"(`never_mode_rows: {summary['config']['never_mode_rows']}`)", "", "## Datasets", ""]
    out += [f"- `{k}`: {DESCRIPTIONS[k]} ({summary['records'].get(k, 0)} records)" for k in KINDS]
    out += ["", "## Filters", "", "| filter | before | dropped | after |", "|---|---|---|---|"]
    out += [f"| {f['filter']} | {f['before']} | {f['dropped']} | {f['after']} |" for f in filter_table(counts)]
    out += [""] + control_strings_section(counts)
    out += ["## Label distributions", "", "| label | count |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in sorted(summary["labels"].items())]
    out += ["", "## Export config", "", "```json", json.dumps(summary["config"], indent=2, sort_keys=True), "```",
            "", "## License", "", "Not set: fill in `license` in the header above.", ""]
    return "\n".join(out)
