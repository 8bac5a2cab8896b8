"""mlx-dpo: DPO fine-tuning on MLX from a precomputed Parquet reference cache."""

from ._blas import load_openblas

# Must run before anything imports mlx: MLX binds its BLAS symbols when it loads.
BLAS_STATUS = load_openblas()

__version__ = "0.1.0"
__all__ = ["BLAS_STATUS", "preference_loss"]


def __getattr__(name):
    # Lazy, so `import mlx_dpo` (and `mlx-dpo --help`) does not import mlx.
    if name == "preference_loss":
        from .losses import preference_loss

        return preference_loss
    raise AttributeError(f"module 'mlx_dpo' has no attribute {name!r}")
