"""Consortium side: the Flower ServerApp and its aggregation strategy."""
