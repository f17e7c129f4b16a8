"""The evaluation's figures printed as tables (the report itself is one JSON object)."""

from __future__ import annotations

from .synthetic import MODES


def pct(value) -> str:
    """A fraction as a percentage with one decimal (``-`` when not measured)."""
    return "-" if value is None else f"{100 * value:.1f}%"


def print_synthetic(rep: dict, modes: list[str]) -> None:
    """The synthetic report as tables: accuracy and retrieval rate per mode, probes, long form,
    well-formed generations."""
    cols = [m for m in MODES if m in modes] + [m for m in modes if m not in MODES]
    head = f"{'':34s}" + "".join(f"{m:>11s}" for m in cols)
    print(f"\nheld-out questions ({rep['n_knowledge']} knowledge, {rep['n_no_knowledge']} no-knowledge, "
          f"{rep.get('n_long_form', 0)} long-form; match accuracy)")
    print(head)
    lines = [("accuracy, knowledge", "accuracy_{m}"), ("accuracy, no-knowledge", "accuracy_{m}_no_knowledge"),
             ("accuracy, all", "accuracy_{m}_all"), ("retrieval rate, knowledge", "retrieval_rate_{m}_knowledge"),
             ("retrieval rate, no-knowledge", "retrieval_rate_{m}_no_knowledge"),
             ("accuracy, long-form (any value)", "accuracy_{m}_long_form"),
             ("retrieval rate, long-form", "retrieval_rate_{m}_long_form")]
    for label, key in lines:
        print(f"{label:34s}" + "".join(f"{pct(rep.get(key.format(m=m))):>11s}" for m in cols))
    print(f"{'error rows':34s}" + "".join(f"{str(rep.get(f'error_rows_{m}')):>11s}" for m in cols))
    print(f"retrieval decision right (adaptive): {pct(rep.get('retrieval_decision_right'))} at the run's threshold, "
          f"{pct(rep.get('retrieval_decision_right_first_token'))} by the model's first token (P > 0.5)")
    print(f"\nprobes (mode always, one passage per row; {rep['n_probe_gold']} gold, "
          f"{rep['n_probe_unrelated']} unrelated, {rep['n_probe_counterfactual']} counterfactual; "
          f"read from {rep['probe_basis']})")
    probes = [
        ("relevant_on_gold", "gold passage: first token [Relevant]"),
        ("irrelevant_on_unrelated", "another entity's passage: first token [Irrelevant]"),
        ("accuracy_with_gold_ctx", "gold passage: answer matches the gold"),
        ("counterfactual_follow_rate", "swapped value: answer has the swapped value"),
        ("counterfactual_original_rate", "swapped value: answer has the original value"),
        ("gold_ranked_first", "index top-k, always: best passage is the gold one"),
        ("gold_in_top_k", "index top-k, always: gold passage retrieved"),
        ("gold_retrieved_first", "index top-k, always: index ranked gold first"),
        ("gold_in_corpus", "gold passages present in retrieval.corpus"),
        ("gold_ranked_first_adaptive", "index top-k, adaptive rows that retrieved"),
    ]
    for key, what in probes:
        print(f"  {key:30s} {pct(rep.get(key)):>7s}  {what}")
    print(f"\nlong-form questions (task asqa, adaptive run, tree decoding; {rep.get('n_long_form', 0)} rows)")
    long_form = [
        ("long_form_accuracy", "answer has both gold values"),
        ("long_form_two_segments", "answered in two or more segments"),
        ("long_form_depth_two", "path of depth >= 2 (repeated segments included)"),
        ("long_form_citations_valid", "every [n] names docs[n-1], its own passage"),
        ("long_form_gold_cited", "gold passage among the cited docs"),
    ]
    print(f"  {'long_form_error_rows':30s} {str(rep.get('long_form_error_rows')):>7s}  rows that failed (counted as wrong)")
    for key, what in long_form:
        print(f"  {key:30s} {pct(rep.get(key)):>7s}  {what}")
    print(f"\nwell-formed generations ([Utility:k] then end of sequence, from token ids): "
          f"{pct(rep['well_formed_rate'])} of {rep['well_formed_checked']} (always run: "
          f"{pct(rep['well_formed_rate_always'])}); {rep['well_formed_unchecked']} without recorded token ids")


def print_generic(rep: dict) -> None:
    """The report of official files or existing outputs as a table: per run and task."""
    print(f"\n{'run':10s} {'task':12s} {'metric':7s} {'rows':>6s} {'errors':>7s} {'scored':>7s} "
          f"{'accuracy':>9s} {'retrieval':>10s}")
    for label, tasks in rep["per_task"].items():
        for task, s in tasks.items():
            print(f"{label:10s} {task:12s} {s['metric'] or '-':7s} {s['rows']:6d} {s['errors']:7d} "
                  f"{s['scored']:7d} {pct(s['accuracy']):>9s} {pct(s['retrieval_rate']):>10s}")
        print(f"{label:10s} {'(overall)':12s} {'':7s} {rep[f'rows_{label}']:6d} {rep[f'error_rows_{label}']:7d} "
              f"{'':7s} {pct(rep[f'accuracy_{label}']):>9s} {pct(rep[f'retrieval_rate_{label}']):>10s}")
    print(f"\nwell-formed generations: {pct(rep['well_formed_rate'])} of {rep['well_formed_checked']} "
          f"with token ids; {rep['well_formed_unchecked']} without")
