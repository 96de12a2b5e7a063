"""Make `fastpipe` importable from this assignment's src/ folder, as the public tests' conftest.py does.

The grader also puts src/ on PYTHONPATH; this lets the hidden tests run from a checkout as well.
"""

import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))
