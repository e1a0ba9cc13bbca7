"""`python -m vespo_trainer ...` is the `vespo` command."""
import sys

from .cli import main

sys.exit(main())
