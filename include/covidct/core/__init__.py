"""Shared plumbing every layer may use: errors, paths, atomic publish, locks, versions, the Spark session."""
