"""The data folder (``DATA_DIR``): created private to the service user at start-up, with its models folder."""

from __future__ import annotations

from pathlib import Path

from persistence.private import private_dir
from server.settings import Settings

MODELS = "models"
"""Where built-in demo models are built, inside the data folder."""


def prepare_data_dir(settings: Settings) -> Path:
    """Create ``DATA_DIR`` (0700) and, when built-in models may be built there, its ``models`` folder (0700).

    Existing folders keep their mode (an operator's choice), with a warning when other users can reach them; the
    files written inside (key pepper, SQLite database) are 0600 themselves.
    """
    data = private_dir(settings.data_dir, "DATA_DIR")
    if settings.model.startswith("builtin:") or settings.models_file is not None:
        private_dir(data / MODELS, "the demo model folder")
    return data
