"""Grids of ordinary runs (the auxiliary-data study, the benchmark sweeps): running them
(:mod:`.running`) and reporting their results (:mod:`.reporting`)."""

from typing import TYPE_CHECKING

from lightning_defense.lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_defense.study.reporting import markdown_table, plot_results, write_results
    from lightning_defense.study.running import Cell, Study, main, read_metrics, run_logged, summarize, supersede

__all__ = [
    "Cell",
    "Study",
    "main",
    "markdown_table",
    "plot_results",
    "read_metrics",
    "run_logged",
    "summarize",
    "supersede",
    "write_results",
]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
