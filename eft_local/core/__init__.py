"""The math and the options, pure Python and NumPy: combination, samplers, SamplingParams, deltas, text, errors."""
