"""`python -m mlpmemory ...` is `mlpmem ...` (what torchrun launches: `torchrun ... -m mlpmemory run ...`)."""

import sys

from .cli import main

sys.exit(main())
