#!/usr/bin/env python3
"""Stable Diffusion 1.5 text-to-image on MAX, behind the sdsecure security gate.

    python python/text_to_image_secure.py --prompt "a photo of an astronaut riding a horse on mars"

Every model is validated by the gate before anything is compiled or run. See --help, and
--list-safe-models for what is known about SD 1.5 models. Logic: sdsecure/cli/generate.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from sdsecure.cli.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
