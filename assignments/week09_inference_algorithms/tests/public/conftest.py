"""Make `fastinfer` importable from this assignment's src/ folder, wherever pytest is started from."""

import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))
