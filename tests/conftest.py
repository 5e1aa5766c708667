from __future__ import annotations

import os

# Keep every rank single-threaded on the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
