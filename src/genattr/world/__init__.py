"""Worlds to run the whole method on without a GPU or downloads."""
