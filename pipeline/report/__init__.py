"""Run reports: figures of an annotated output, plotted into one self-contained HTML page
(``write``: the page of an output or of an evaluation; ``summary``: the figures; ``page`` and
``svg``: the page and its plots; ``examples``: example rows)."""
