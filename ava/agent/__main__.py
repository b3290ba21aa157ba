"""`python3 -m ava.agent CMD ...` (in the zipapp: `python3 agent.pyz CMD ...`)."""

import sys

from .main import main

sys.exit(main())
