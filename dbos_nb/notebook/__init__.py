"""The notebook layer: magics, batches, progress views and DataFrames.

Importing this package is cheap: IPython, ipywidgets and pandas are imported only by the modules
that use them (magics.py, views.py, frames.py), when they are used. `%load_ext dbos_nb` calls
`load_ipython_extension` below.
"""

from __future__ import annotations

from typing import Any

from dbos_nb.notebook.batch import Batch, Progress, Queue, UnknownBatchError


def load_ipython_extension(ipython: Any) -> None:
    """Register the dbos_nb magics (loading the extension twice is harmless)."""
    from dbos_nb.notebook.magics import DbosMagics

    if getattr(ipython, "_dbos_nb_magics_loaded", False):
        return
    ipython.register_magics(DbosMagics)
    ipython._dbos_nb_magics_loaded = True


def unload_ipython_extension(ipython: Any) -> None:
    """Nothing to undo: DBOS keeps running until DBOS.destroy()."""


def workflows_frame(**filters: Any) -> Any:
    """A pandas DataFrame of workflows (same filters as `DBOS.list_workflows`)."""
    from dbos_nb.notebook.frames import workflows_frame as build

    return build(**filters)


__all__ = [
    "Batch",
    "Progress",
    "Queue",
    "UnknownBatchError",
    "load_ipython_extension",
    "unload_ipython_extension",
    "workflows_frame",
]
