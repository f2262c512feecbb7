"""Data stage: files -> normalized examples -> chat-templated tokens with loss masks -> cached datasets.

formats.py reads and normalizes rows; template.py renders them with the chat template and marks the
tokens that carry loss; build.py mixes, splits, tokenizes and caches a run's datasets; augment.py
varies prompts per epoch; labelled.py is the classification task's rows; inspect.py shows it all.
"""
