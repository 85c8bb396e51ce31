"""Deprecated (lalora 0.1's name): the plots moved to ``lalora.comparison.plot``; importing this module warns."""
import warnings

from .comparison.plot import plot_result

warnings.warn("lalora.compare_plot is deprecated: use lalora.comparison.plot (plot_result)", DeprecationWarning,
              stacklevel=2)

__all__ = ["plot_result"]
