"""data/: rows in, training examples out. Reading local files and hub data sets (layouts: columns, alpaca, sharegpt),
rendering each row to a prompt and a completion, encoding with the completion mask, the length policy, the report.
"""
