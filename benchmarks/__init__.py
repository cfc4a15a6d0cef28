"""Benchmarks of peft-ssf: each module answers one question, prints a table and writes ``results/<name>.{json,md}``.

Run them as modules from the repository root (``python -m benchmarks.train_cost --quick``); see README.md in this
folder. They write only their own results files: the README blocks made from those files are refreshed by
``make docs`` (``python -m benchmarks.docs``), never as a side effect of a run.
"""
