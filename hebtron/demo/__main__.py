"""``python -m hebtron.demo`` (``make demo``): see :mod:`hebtron.demo.run`."""

import sys

from hebtron.demo.run import main

sys.exit(main())
