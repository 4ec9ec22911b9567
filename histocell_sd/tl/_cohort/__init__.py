"""Cohorts: indicators over many samples, survival and drug-response association, phenotype screening."""
