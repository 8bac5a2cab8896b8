"""Stage 2: cached Parquet -> batches -> policy log-probs -> DPO loss -> optimizer step."""
