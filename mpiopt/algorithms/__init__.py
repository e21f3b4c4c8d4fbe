"""Algorithms; importing this package registers every algorithm."""
