"""Evaluation: token-level perplexity, loss against evaluation length, and an lm-evaluation-harness backend.

- `ratlm.evaluation.perplexity`: `evaluate_perplexity` (windows, strides, loss per position), `token_losses`
- `ratlm.evaluation.length`: `length_sweep` and its plot (the paper's Figure 6)
- `ratlm.evaluation.inputs`: `load_model`, `load_tokens` (text, JSONL, `ratlm tokenize` shards, .bin, .npy)
- `ratlm.evaluation.harness`: the `ratlm` model of lm-evaluation-harness (`pip install 'ratlm[eval]'`)
- `ratlm.evaluation.cli`: `ratlm eval ppl | length | harness`

Documents follow SPEC §3: each one is followed by EOS, and the target right after an EOS is not scored.
"""
