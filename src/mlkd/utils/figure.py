"""matplotlib figures for files, with no global side effects: every chart mlkd draws starts here."""

from __future__ import annotations

from typing import Any


def agg_figure(**kwargs: Any) -> Any:
    """A ``matplotlib.figure.Figure(**kwargs)`` on its own Agg canvas: never pyplot's, so the caller's backend and
    open figures stay as they are, and no display is needed. Unregistered with pyplot, it needs no closing.
    matplotlib is imported here, on first use, so importing the modules that draw costs nothing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig
