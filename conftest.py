"""Settings for the whole test run (tests/ and the notebooks checked by nbval)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_NOTEBOOK_DIR_KEY = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    # Notebooks keep their databases in a fresh folder per run, not beside the notebook, so a
    # second run does not find the first run's finished work (and their outputs stay the same).
    folder = tempfile.mkdtemp(prefix="dbos_nb_notebooks_")
    config.stash[_NOTEBOOK_DIR_KEY] = folder
    os.environ["DBOS_NB_DIR"] = folder


def pytest_unconfigure(config: pytest.Config) -> None:
    # Removed even after a failed run: a run's databases are of no use to the next one (which
    # makes its own folder), and one folder per run used to pile up in the temporary folder.
    # A detached worker a notebook left running may still hold files there: ignored.
    folder = config.stash.get(_NOTEBOOK_DIR_KEY, None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
