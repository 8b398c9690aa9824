"""Recipes of models and their downloads from a Hugging Face hub."""
