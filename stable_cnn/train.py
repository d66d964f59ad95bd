"""``python -m stable_cnn.train``: the train command, as torchrun, srun and scripts start
it (``torchrun --nproc_per_node=4 -m stable_cnn.train ...``). It is
``stable-cnn-train``; the command itself lives in stable_cnn/cli/train.py."""

if __name__ == "__main__":
    from stable_cnn.cli.train import cli

    cli()
