"""Progress views of batches: a live ipywidgets view, with HTML and text fallbacks.

The live view follows what works under ipykernel 7: the cell displays the widget, then a daemon
thread reads progress from the database a few times a second and only changes widget values (it
never prints or displays). Reading from the database means the view shows the work of every
process and works the same after a kernel restart.

The widget is displayed with a static HTML/text snapshot beside it, which front-ends that do
not render widgets show instead. Where widgets cannot render at all (terminal IPython, no
ipywidgets, or DBOS_NB_PROGRESS=text), only the snapshot is shown; a finished `wait()` always
leaves a static summary in the cell (in the live view's place) so a saved notebook shows the
result.
"""

from __future__ import annotations

import html
import logging
import os
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dbos_nb.notebook.batch import Batch, Progress

logger = logging.getLogger(__name__)

UPDATE_INTERVAL_SEC = 0.25  # at most four updates a second
_COLORS = {
    "queued": "#9e9e9e",
    "running": "#1e88e5",
    "done": "#43a047",
    "failed": "#e53935",
    "cancelled": "#fb8c00",
}


def _ipython() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def display(obj: Any, *, replaceable: bool = False) -> Any:
    """IPython's display (untyped upstream), imported only when something is shown; with
    `replaceable`, returns the handle that can replace the output in place."""
    from IPython import display as ipython_display

    show: Any = ipython_display.display
    return show(obj, display_id=True) if replaceable else show(obj)


def display_bundle(bundle: dict[str, Any]) -> Any:
    """Display a MIME bundle as it is; returns the handle that can replace it in place."""
    from IPython import display as ipython_display

    show: Any = ipython_display.display
    return show(bundle, raw=True, display_id=True)


def live_bundle(widget: Any, p: Progress) -> dict[str, Any]:
    """The live widget, with the batch's snapshot at display time as its text and HTML: what a
    notebook saved before the batch ended shows where widgets do not render (GitHub, nbviewer,
    a notebook executed by nbconvert), instead of the widget's repr."""
    bundle: dict[str, Any] = dict(widget._repr_mimebundle_())
    bundle["text/plain"] = progress_text(p)
    bundle["text/html"] = progress_html(p)
    return bundle


def current_cell() -> int | None:
    """The number of the cell being run (None outside IPython)."""
    ip = _ipython()
    return None if ip is None else int(ip.execution_count)


def in_ipython() -> bool:
    return _ipython() is not None


def widgets_available() -> bool:
    """Whether a live widget can render here (a Jupyter kernel with ipywidgets)."""
    if os.environ.get("DBOS_NB_PROGRESS", "").lower() == "text":
        return False
    ip = _ipython()
    if ip is None or "IPKernelApp" not in getattr(ip, "config", {}):
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def progress_text(p: Progress) -> str:
    width = 30
    filled = round(width * p.fraction)
    bar = "#" * filled + "-" * (width - filled)
    lines = [f"[{bar}] {p.summary()}"]
    if p.stalled is not None:
        lines.append(f"  stalled: {p.stalled}")
    lines += [f"  error in {wid}: {msg}" for wid, msg in p.recent_errors]
    return "\n".join(lines)


def _counts_html(p: Progress) -> str:
    cells = []
    for group, n in p.counts.items():
        color = _COLORS.get(group, "#555")
        cells.append(f'<span style="color:{color};margin-right:1em"><b>{n}</b> {group}</span>')
    return "".join(cells)


def _extras_html(p: Progress) -> str:
    parts = []
    if p.throughput_per_s > 0 and not p.complete:
        parts.append(f"{p.throughput_per_s:.1f} items/s")
    if p.eta_s is not None and not p.complete:
        from dbos_nb.notebook.batch import format_seconds

        parts.append(f"ETA {format_seconds(p.eta_s)}")
    if p.rate_limit is not None:
        parts.append(f"rate limit: {p.rate_used}/{p.rate_limit} per {p.rate_period_s:g}s used")
    if p.tokens or p.cost:
        parts.append(f"{p.tokens:,} tokens · ${p.cost:.4f}")
    return " · ".join(parts)


def _errors_html(p: Progress) -> str:
    if not p.recent_errors:
        return ""
    items = "".join(
        f"<li><code>{html.escape(wid)}</code>: {html.escape(msg[:300])}</li>"
        for wid, msg in p.recent_errors
    )
    return f'<div style="color:#e53935">latest errors:<ul>{items}</ul></div>'


def _stalled_html(p: Progress) -> str:
    if p.stalled is None:
        return ""
    return f'<div style="color:#ef6c00"><b>stalled:</b> {html.escape(p.stalled)}</div>'


def progress_html(p: Progress) -> str:
    """A static HTML snapshot (what a saved notebook keeps)."""
    pct = round(100 * p.fraction, 1)
    done_color = _COLORS["failed"] if p.counts["failed"] else _COLORS["done"]
    bar = (
        '<div style="background:#eee;width:320px;height:10px;border-radius:3px">'
        f'<div style="background:{done_color};width:{pct}%;height:10px;border-radius:3px"></div>'
        "</div>"
    )
    return (
        f"<div><b>batch {html.escape(p.batch_id)}</b>: {p.finished}/{p.total} finished "
        f"({pct}%){bar}<div>{_counts_html(p)}</div><div>{_extras_html(p)}</div>"
        f"{_stalled_html(p)}{_errors_html(p)}</div>"
    )


class Snapshot:
    """A displayable static summary (text for terminals, HTML for notebooks)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def __repr__(self) -> str:
        return progress_text(self.progress)

    def _repr_html_(self) -> str:
        return progress_html(self.progress)


class LiveView:
    """An ipywidgets view of a batch, refreshed by a daemon thread until the batch finishes."""

    def __init__(self, batch: Batch) -> None:
        import ipywidgets as w

        self.batch = batch
        self.title = w.HTML()
        self.bar = w.FloatProgress(min=0.0, max=1.0, layout=w.Layout(width="320px"))
        self.counts = w.HTML()
        self.extras = w.HTML()
        self.stalled = w.HTML()
        self.errors = w.HTML()
        self.box = w.VBox(
            [self.title, self.bar, self.counts, self.extras, self.stalled, self.errors]
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dbos_nb-progress", daemon=True)
        self.handle: Any = None  # the output the widget is shown in

    def start(self) -> None:
        self._apply(self.batch.progress())
        self._thread.start()

    def stop(self) -> None:
        """Stop refreshing, after one last update so the widget shows the final state."""
        if not self._stop.is_set():
            self._stop.set()
            try:
                self._apply(self.batch.progress())
            except Exception as exc:
                logger.debug("final progress update failed: %s", exc)

    def settle(self) -> None:
        """Stop refreshing and put the static summary in the widget's place: the cell then
        holds one view of the batch, and a saved notebook shows it (widgets are not saved)."""
        self._stop.set()
        self._thread.join(timeout=2 * UPDATE_INTERVAL_SEC)
        if self.handle is not None:
            self.handle.update(Snapshot(self.batch.progress()))
        else:
            self.stop()

    def _apply(self, p: Progress) -> None:
        with self.box.hold_sync():
            self.title.value = (
                f"<b>batch {html.escape(p.batch_id)}</b>: {p.finished}/{p.total} finished"
            )
            self.bar.value = p.fraction
            self.bar.bar_style = (
                "danger" if p.counts["failed"] else "success" if p.complete else "info"
            )
            self.counts.value = _counts_html(p)
            self.extras.value = _extras_html(p)
            self.stalled.value = _stalled_html(p)
            self.errors.value = _errors_html(p)

    def _run(self) -> None:
        # Only widget values change here: no print, no display (ipykernel 7 drops those).
        while not self._stop.wait(UPDATE_INTERVAL_SEC):
            try:
                progress = self.batch.progress()
            except Exception as exc:  # DBOS destroyed, database gone: stop quietly
                logger.debug("progress view stopped: %s", exc)
                return
            self._apply(progress)
            if progress.complete:
                return


def show_live(batch: Batch) -> LiveView | None:
    """Display a batch: a live widget where one can render, else a static snapshot."""
    if widgets_available():
        view = LiveView(batch)
        view.handle = display_bundle(live_bundle(view.box, batch.progress()))
        view.start()
        return view
    display(Snapshot(batch.progress()))
    return None


def show_summary(batch: Batch) -> None:
    """Leave a static summary in the cell (in IPython), e.g. when a blocking wait ends."""
    if not in_ipython():
        return
    display(Snapshot(batch.progress()))
