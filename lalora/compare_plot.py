"""Deprecated (lalora 0.1's name): the plots moved to ``lalora.comparison.plot``; importing this module warns."""
from .comparison.plot import plot_result
from .errors import warn_deprecated

warn_deprecated("lalora.compare_plot is deprecated: use lalora.comparison.plot (plot_result)")

__all__ = ["plot_result"]
