"""Provisioners: where computes (PostgreSQL servers) actually run."""
