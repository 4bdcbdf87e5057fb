//! Human-readable output: the progress line and the summary table.
