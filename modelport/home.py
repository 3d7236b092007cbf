"""Where modelport keeps what it builds: ``$MODELPORT_HOME``, by default ``~/.cache/modelport``.

Under it: ``models/`` (packaged models, built on first use), ``features/`` (retraining's feature
cache) and ``cache/`` (compiled engines).
"""

from __future__ import annotations

import os
from pathlib import Path


def model_home() -> Path:
    return Path(os.environ.get("MODELPORT_HOME") or Path.home() / ".cache" / "modelport")
