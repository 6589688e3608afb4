"""Analysis: statistics (tests and intervals from statsmodels) and plots for the book."""
