"""``python -m boldstream`` is the ``boldstream`` command."""

import sys

from boldstream.cli import main

sys.exit(main())
