"""Inference: the Predictor (one per-case path for every front end), the fold ensemble, the writers, the worklist,
the operating points and the progress lines."""
