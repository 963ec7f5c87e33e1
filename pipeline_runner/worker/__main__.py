"""``python -m pipeline_runner.worker``: how the deployment starts a worker process."""

import sys

from .process import main

sys.exit(main())
