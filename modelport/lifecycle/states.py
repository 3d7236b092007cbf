"""The states of a model version in one server, one enum for every front-end and the index.

Triton's repository index, plus FAILED and ROLLED_BACK: LOADING -> READY -> UNLOADING -> (gone);
LOADING -> FAILED (with a reason) when a version cannot be loaded; READY -> ROLLED_BACK (unloaded,
with the reason) when a rollout judged it bad. A ``StrEnum``: the wire carries the name itself.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    FAILED = "FAILED"
    UNAVAILABLE = "UNAVAILABLE"
    ROLLED_BACK = "ROLLED_BACK"
