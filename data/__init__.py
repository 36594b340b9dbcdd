"""Data for mos: prepare.py builds corpora, corpus.py loads them, batching.py batches them."""
