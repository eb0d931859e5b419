"""Rendering: figures (``matplotlib.figure.Figure``), the self-contained HTML report and plain-text tables.

It draws arrays and tables handed to it and knows nothing of models, so every layer above may use it.
"""
