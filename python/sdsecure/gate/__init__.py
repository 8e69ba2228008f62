"""The security gate: every entry point calls `validate()`; there is no second, lighter check.

    validate(ref, policy="default", *, revision=None, progress=True) -> VerifiedModel
        Fetch (hub id at a pinned revision, local dir/file, or "embedded"), read every file once,
        hash, check the lockfile, ask reputation, run every rule. Raises SecurityError (with the
        report) when the policy blocks; UserError for a bad ref / unreachable model.
    audit(ref, policy=..., ...) -> VerifiedModel
        Same, but never raises SecurityError: the caller looks at `.report.verdict`.
    load_unverified(ref, *, revision=None) -> VerifiedModel
        --skip-validation: fetch and hash only; `verified=False`; provenance says "unverified".
    All three also take `lockfile=PATH`: a sdsecure.lock.json to verify besides the one inside the
    model folder (hashes, sizes, no unlocked model files, and the pinned revision).
"""

from sdsecure.gate.validate import audit, load_unverified, validate  # noqa: F401
