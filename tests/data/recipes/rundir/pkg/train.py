"""The same script as a module (`module = "pkg.train"`): it must import from the run directory."""

import os
import runpy
import sys

sys.stdout.write(f"MODULE {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}\n")
sys.stdout.flush()
runpy.run_path("rundir.py", run_name="__main__")
