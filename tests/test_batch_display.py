"""What a cell shows for a batch, in a real Jupyter kernel (widgets render there).

`batch.wait()` as a cell's last line is the README's own usage: the cell must hold one view of
the batch (the live widget while it waits, replaced in place by the static summary that a saved
notebook keeps), not the widget, a summary and the returned batch's widget again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from test_kernel_restart import Kernel


def _outputs(kernel: Kernel, code: str) -> list[dict[str, Any]]:
    """The iopub messages that put something in the cell's output."""
    shown: list[dict[str, Any]] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] in ("display_data", "update_display_data", "execute_result"):
            shown.append(msg)
        elif msg["msg_type"] == "error":
            raise AssertionError("\n".join(msg["content"]["traceback"]))

    reply = kernel.kc.execute_interactive(code, output_hook=hook, timeout=120)
    assert reply["content"]["status"] == "ok"
    return shown


def test_wait_as_the_last_line_leaves_one_summary(tmp_path: Path) -> None:
    kernel = Kernel()
    try:
        kernel.run(
            "%load_ext dbos_nb\n"
            f"%dbos_launch --db sqlite:///{tmp_path / 'display.sqlite'} --name display\n"
            "from dbos_nb import DBOS\n"
            "@DBOS.step()\n"
            "def double(x):\n"
            "    return 2 * x\n"
            "%dbos_queue shown --concurrency 2\n"
        )
        shown = _outputs(kernel, "batch = shown.map(double, [1, 2, 3], batch='b')\nbatch.wait()")
        kinds = [m["msg_type"] for m in shown]
        # One output area: the widget, then updated in place to the summary; no second view.
        assert kinds.count("display_data") == 1 and "execute_result" not in kinds, kinds
        widget, *updates = shown
        data = widget["content"]["data"]
        assert "application/vnd.jupyter.widget-view+json" in data
        # Where widgets do not render (a saved notebook on GitHub, nbconvert): the batch's
        # snapshot, not the widget's repr.
        assert "batch b" in data["text/html"] and "/3 finished" in data["text/html"]
        assert "VBox" not in data["text/plain"] and "/3 finished" in data["text/plain"]
        display_id = widget["content"]["transient"]["display_id"]
        final = updates[-1]["content"]
        assert final["transient"]["display_id"] == display_id
        assert "3/3 finished" in final["data"]["text/html"]
        # Shown again in a later cell, the batch is displayed as usual.
        later = _outputs(kernel, "batch")
        assert [m["msg_type"] for m in later] == ["display_data"]
    finally:
        kernel.shutdown()
