"""Shared fixtures: offline environment, tiny models, one Prefect server per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the network; set before transformers/datasets are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """One random-weight model directory per family spec, built once per session (read-only)."""
    root = tmp_path_factory.mktemp("zoo")
    return {spec: tiny.model_dir(root, spec) for spec in tiny.SPECS}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    return tiny.text_file(root, "train.txt", sentences=600)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> str:
    """A temporary Prefect server for the whole session; subprocesses reach it through
    PREFECT_API_URL, so none of them pays the 12-15 s ephemeral-server start."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        url = str(get_current_settings().api.url)
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            os.environ.pop("PREFECT_API_URL", None)
