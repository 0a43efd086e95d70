"""Train a tokenizer or compressor: `python train.py experiment=<name> [key=value ...]`."""

import hydra
from omegaconf import DictConfig

import tokenmill.config  # noqa: F401  (registers the OmegaConf resolvers that conf/ uses)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from tokenmill.trainers import train

    train(cfg)


if __name__ == "__main__":
    main()
