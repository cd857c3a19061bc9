"""Where the data tests find the shared real data: ``$METAFIT_DATA``, else
``../shared/data`` beside the project.

The fallback is the tests' own: the library reads ``$METAFIT_DATA`` or an explicit path,
never a folder relative to the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

SHARED_DATA = Path(
    os.environ.get("METAFIT_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
