"""Deconvolution: spot proportions from expression (Tangram, Poisson) and their histology-refined version."""
