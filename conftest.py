"""Settings for the whole test run (tests/ and the notebooks checked by nbval)."""

from __future__ import annotations

import os
import tempfile

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Notebooks keep their databases in a fresh folder per run, not beside the notebook, so a
    # second run does not find the first run's finished work (and their outputs stay the same).
    os.environ["DBOS_NB_DIR"] = tempfile.mkdtemp(prefix="dbos_nb_notebooks_")
