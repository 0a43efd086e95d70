"""Train a tokenizer or compressor: `python train.py experiment=<name> [key=value ...]`."""

import warnings

import hydra
from omegaconf import DictConfig

import tokenmill.config  # noqa: F401  (registers the OmegaConf resolvers that conf/ uses)

# conf/hydra/launcher/submitit_local.yaml shares its name with the plugin's schema, which Hydra
# then validates it against (and warns that this matching is deprecated); the file names its
# launcher class itself, so it works with or without that validation.
warnings.filterwarnings("ignore", message=r"(?s).*hydra/launcher/submitit_local' is validated against ConfigStore")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from tokenmill.trainers import train

    train(cfg)


if __name__ == "__main__":
    main()
