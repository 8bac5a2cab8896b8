"""Stage 1: raw preference data -> token ids -> reference log-probs -> sharded Parquet cache."""
