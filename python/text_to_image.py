#!/usr/bin/env python3
"""The original, UNVALIDATED text-to-image script, kept for comparison.

It loads the model without the security gate's rules (the files are only hashed), prints a warning
banner, and stamps "unverified" into the PNG. Use text_to_image_secure.py instead.
Logic: sdsecure/cli/generate.py (main_unverified).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from sdsecure.cli.generate import main_unverified  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_unverified())
