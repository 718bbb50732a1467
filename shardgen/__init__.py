"""Offline stage: public datasets, as published, to weighted WebDataset shards (issue 3)."""
