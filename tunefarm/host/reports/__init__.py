"""Reports: a tuning job's report, the compare report, and their plots."""
