"""`python -m cxrkit COMMAND ...`, the same as the `cxrkit` command (cxrkit.cli.main)."""
import sys

from cxrkit.cli.main import main

sys.exit(main())
