"""data/: rows in, training examples out. Reading local files and hub data sets (layouts: columns, alpaca, sharegpt),
rendering each row to a prompt and a completion, encoding with the completion mask, the length policy, the report;
for GRPO, rows with checkable answers (checkable.py; multiple-choice rows in choices.py, shared with eval/).
"""
