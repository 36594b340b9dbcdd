"""Data for mos: prepare.py builds corpora, batching.py loads and batches them."""
