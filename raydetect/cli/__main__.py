"""``python -m raydetect.cli``: the ``raydetect`` command."""

import sys

from raydetect.cli import main

sys.exit(main())
