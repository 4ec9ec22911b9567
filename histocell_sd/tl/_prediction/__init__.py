"""Prediction: a trained model's outputs written into the SpatialData, and scores against truth."""
