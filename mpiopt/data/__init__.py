"""Datasets and partitions; importing this package registers every dataset."""
