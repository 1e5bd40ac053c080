"""``python -m i2i_unlearning ...`` is the same as the ``i2iu`` console script."""

from .cli import main

main()
