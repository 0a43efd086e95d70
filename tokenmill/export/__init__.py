from tokenmill.export.pretrained import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    PretrainedMixin,
    build_model,
    from_pretrained,
    model_config,
    save_pretrained,
)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PretrainedMixin",
    "build_model",
    "from_pretrained",
    "model_config",
    "save_pretrained",
]
