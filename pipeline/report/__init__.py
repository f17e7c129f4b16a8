"""Run reports: figures of an annotated output, plotted into one self-contained HTML page."""
