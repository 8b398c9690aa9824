"""``eft-local eval``'s library: configurations, scoring, results files and plots."""
