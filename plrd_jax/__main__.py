import sys

from plrd_jax.cli import main

sys.exit(main())
