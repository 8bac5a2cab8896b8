"""`mlx-dpo train ARGS` with plain SGD at learning rate 1 in place of AdamW (`python sgd_train.py ARGS`,
under mlx.launch too). A LoRA B starts at 0, so after one step with --max-grad-norm 0 each B in
adapters.safetensors is minus that step's gradient, exactly (0 - 1·g): tests read a step's gradient there.
AdamW would hide it: its first step is ±learning rate whatever the gradient's size."""

import sys  # noqa: I001  (the order below is deliberate)

import mlx_dpo  # noqa: F401  (first: loads OpenBLAS before mlx)
import mlx.optimizers as optim


def sgd(cfg) -> optim.SGD:
    """Stands in for mlx_dpo.trainer.run.build_optimizer."""
    return optim.SGD(learning_rate=1.0)


if __name__ == "__main__":
    from mlx_dpo.cli import main
    from mlx_dpo.trainer import run

    run.build_optimizer = sgd
    sys.argv = ["mlx-dpo", "train", *sys.argv[1:]]
    main()
