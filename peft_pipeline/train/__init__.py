"""Train stage: one setup -> fit -> save sequence (loop.py) that every training method plugs into.

Methods: sft.py (the default) and classify.py (a classification head); tasks.method_for picks one.
Around them: hardware.py (precision, CPU/GPU), controls.py (freezing, early stopping, NEFTune),
preflight.py (memory estimate), callbacks.py (log lines, guards).
"""
