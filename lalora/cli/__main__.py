"""``python -m lalora.cli ARGS``: the ``lalora`` command."""
import sys

from . import main

sys.exit(main())
