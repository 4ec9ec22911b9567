"""Spatial analysis: the cell graph, tissue architecture (niches) and spatial organisation indicators."""
