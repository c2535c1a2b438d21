"""Evaluation: token-level perplexity, loss against evaluation length, and an lm-evaluation-harness backend.

- `ratlm.evaluation.perplexity`: `evaluate_perplexity` (windows, strides, loss per position), `token_losses`
- `ratlm.evaluation.length`: `length_sweep` and its plot (the paper's Figure 6)
- `ratlm.evaluation.inputs`: `load_model`, `load_tokens` (text, JSONL, `ratlm tokenize` shards, .bin, .npy)
- `ratlm.evaluation.harness`: the `ratlm` model of lm-evaluation-harness (`pip install 'ratlm[eval]'`)
- `ratlm.evaluation.longbench`, `longbench_score`: LongBench v1 predictions and LongBench's scores
- `ratlm.evaluation.ruler`: RULER's needle-in-a-haystack tasks, made offline, and their scores
- `ratlm.evaluation.answers`: greedy answers to many prompts in batches (what LongBench and RULER share)
- `ratlm.evaluation.cli`, `long_cli`: `ratlm eval ppl | length | harness | longbench | ruler`

Documents follow SPEC §3: each one is followed by EOS, and the target right after an EOS is not scored.
"""
