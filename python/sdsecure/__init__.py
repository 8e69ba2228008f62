"""sdsecure: Stable Diffusion 1.5 on MAX, behind a security gate.

Flow: model ref -> fetch (hub.py) -> gate (gate.validate) -> VerifiedModel -> engine -> pipeline.
Only the gate reads model files from disk; everything downstream gets the verified bytes.
"""

__version__ = "0.1.0"
