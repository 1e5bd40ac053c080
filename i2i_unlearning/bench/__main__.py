"""``python -m i2i_unlearning.bench [overrides]`` is the same as ``i2iu-bench``."""

import sys

from .main import main

sys.exit(main())
