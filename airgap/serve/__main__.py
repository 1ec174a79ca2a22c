"""`python -m airgap.serve`: the server process, started by `airgap serve` inside the installed venv."""

import sys

from airgap.serve import main

sys.exit(main())
