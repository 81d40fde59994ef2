"""Data: video ingestion, flow records and the grain pipeline."""
