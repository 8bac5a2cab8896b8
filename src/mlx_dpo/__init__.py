"""mlx-dpo: DPO fine-tuning on MLX from a precomputed Parquet reference cache."""

from ._blas import load_openblas

# Must run before anything imports mlx: MLX binds its BLAS symbols when it loads.
BLAS_STATUS = load_openblas()

__version__ = "0.1.0"
