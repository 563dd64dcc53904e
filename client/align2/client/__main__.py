"""``python -m align2.client`` is the ``align2`` command."""

import sys

from align2.client.cli import main

sys.exit(main())
