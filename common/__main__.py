"""`python -m common ...` is `effdl ...` without installing the project, e.g. on an offline runner whose
environment holds only the locked wheels (README.md, "GPU runners without internet")."""

import sys

from common.cli import main

sys.exit(main())
