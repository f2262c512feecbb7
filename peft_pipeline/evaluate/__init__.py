"""Evaluate stage: losses and generation metrics of a run, base vs adapter, and the checks later stages share.

run.py is the `eval` verb; generate.py decodes prompts (eval, generate, chat); metrics.py scores
answers; retention.py is the forgetting check; harness.py runs lm-evaluation-harness (eval --harness);
parity.py compares two models (merge, export);
classify.py scores a classification head.
"""
