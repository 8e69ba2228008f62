#!/usr/bin/env python3
"""Audit a model with the sdsecure security gate (thin entry point; the code is sdsecure.cli.audit).

    python python/model_security.py --model-id embedded
    python python/model_security.py --model-id org/name --revision main --strict --format sarif --output report.sarif
    python python/model_security.py --model-id ./my-sd15-onnx --netron
    python python/model_security.py lock --model-id org/name --output sdsecure.lock.json

Exit codes: 0 allowed, 1 blocked by the policy, 2 could not complete.
"""

import sys

from sdsecure.cli.audit import main

if __name__ == "__main__":
    sys.exit(main())
