"""`python -m pipeline.train JOB.yaml`: one training process (run it under `accelerate launch` for several)."""

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipeline.train.stage import main

sys.exit(main())
