"""SD 1.5 pipeline on a VerifiedModel: tokenizer, numpy schedulers, CFG denoise loop, PNG output."""
