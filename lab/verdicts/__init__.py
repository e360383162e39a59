"""From results to verdicts: the results file, the properties, the reports."""
