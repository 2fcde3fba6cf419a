"""``python -m service``: the same as the ``taskgate`` command."""

import sys

from service.cli.main import main

sys.exit(main())
