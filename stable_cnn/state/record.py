"""What a checkpoint says about its run, as one typed record: the model spec, the composed
config (the data's normalisation and image size among it), the class names, where and
how it trained (device type, resolved precision and layout, processes) and whether it
holds the weight average. The run's state writes it into every checkpoint through
``as_state``; resume, eval, export and predict read it through ``read``, so that no one
digs in a checkpoint's raw dictionary.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from stable_cnn.config import CustomDataConfig, DataConfig, ImageFolderConfig, SyntheticDataConfig
from stable_cnn.models.build import build_model
from stable_cnn.state.checkpoint import CheckpointError, load_model_weights

# timm keyword arguments that make timm read a file or fetch one when it builds a model
TIMM_FILE_KWARGS = ("checkpoint_path", "cache_dir", "pretrained_cfg", "pretrained_cfg_overlay")


def amp_option(precision: str) -> str:
    """The ``amp=`` option that gives a resolved precision (fp32 is ``amp=off``)."""
    return "off" if precision == "fp32" else precision


def data_config(values: dict[str, Any]) -> DataConfig:
    """A data config as a checkpoint saved it (keys a newer or older stable-cnn added or
    dropped are passed over: the data is what it was)."""
    values = {"sampling": "first", **values}  # how runs before data.sampling drew limits
    schemas = {
        "synthetic": SyntheticDataConfig,
        "custom": CustomDataConfig,
        "image_folder": ImageFolderConfig,
    }
    schema = schemas.get(values.get("name"), DataConfig)
    if "_target_" in values:  # a dataset of the user's, under a name of their own
        schema = CustomDataConfig
    if schema is CustomDataConfig and "in_memory" in values:  # became data.cache on 2026-12-02
        values = dict(values)
        values["cache"] = "memory" if values.pop("in_memory") else "none"
    known = {f.name for f in fields(schema)}
    kept = {key: value for key, value in values.items() if key in known}
    if schema is CustomDataConfig:  # its +data.KEY=VALUE keys, as the command line gave them
        extra = {key: value for key, value in values.items() if key not in known}
        kept["kwargs"] = {**kept.get("kwargs", {}), **extra}
    return schema(**kept)


@dataclass(frozen=True)
class CheckpointRecord:
    model_config: dict[str, Any]  # what it takes to rebuild the model
    config: dict[str, Any]  # the composed config of the run
    class_names: tuple[str, ...]  # empty in checkpoints from before they were saved
    device_type: str | None  # cpu, cuda, mps; None in the oldest checkpoints
    precision: str | None  # the resolved precision, fp32 | fp16 | bf16 (None: unrecorded)
    channels_last: bool | None  # the resolved layout (None: unrecorded)
    world_size: int = 1  # processes that trained it
    averaged: bool = False  # it holds the weight average (ema=on), which the run tested
    # data keys the config left null and the data settled (data=custom's mean and std...)
    data_resolved: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, state: dict[str, Any], path: Path) -> CheckpointRecord:
        """The record of a loaded checkpoint (``path`` names it in errors)."""
        config = state.get("config") or {}
        if not isinstance(state.get("model_config"), dict) or not isinstance(config, dict):
            raise CheckpointError(f"{path} holds no model config: it was not written by stable-cnn")
        runtime = state.get("runtime") or {}
        return cls(
            model_config=state["model_config"],
            config=config,
            class_names=tuple(state.get("class_names") or ()),
            device_type=state.get("device_type"),
            precision=runtime.get("precision"),
            channels_last=runtime.get("channels_last"),
            world_size=state.get("world_size", 1),
            averaged=state.get("ema") is not None,
            data_resolved=dict(state.get("data_resolved") or {}),
        )

    def as_state(self) -> dict[str, Any]:
        """The record's part of a checkpoint (the weight average is saved with the weights)."""
        return {
            "model_config": self.model_config,
            "class_names": list(self.class_names),
            "config": self.config,
            "device_type": self.device_type,
            "runtime": self.runtime,
            "world_size": self.world_size,
            "data_resolved": self.data_resolved,
        }

    @property
    def runtime(self) -> dict[str, Any] | None:
        """The resolved precision and layout, as hardware.Runtime.record() gives them."""
        if self.precision is None:
            return None
        return {"precision": self.precision, "channels_last": self.channels_last}

    @property
    def data(self) -> DataConfig:
        """The run's data config, with what the data settled where it was left null."""
        if "data" not in self.config:
            raise CheckpointError(
                "the checkpoint holds no data config: it was not written by stable-cnn-train"
            )
        # a checkpoint never makes us fetch into a folder it names (data.download=true on
        # the command line still may)
        return data_config({**self.config["data"], **self.data_resolved, "download": False})

    @property
    def seed(self) -> int:
        return int(self.config.get("trainer", {}).get("seed", 0))

    def model_code(self) -> list[str]:
        """What rebuilding the model would import and call, or open, beyond stable-cnn's
        own models: a model callable of the user's, a file timm would read."""
        kind = self.model_config.get("kind", "small_cnn")
        if kind == "custom":
            return [f"model._target_={self.model_config.get('target')}"]
        kwargs = (self.model_config.get("kwargs") or {}) if kind == "timm" else {}
        return [f"+model.{key}={kwargs[key]}" for key in TIMM_FILE_KWARGS if key in kwargs]

    def data_code(self) -> list[str]:
        """What opening the run's own data would import and call (data=custom's callable)."""
        data = self.config.get("data") or {}
        return [f"data._target_={data.get('_target_')}"] if data.get("name") == "custom" else []

    def runtime_settings(self, device_type: str) -> tuple[str, bool | None]:
        """The ``amp`` and ``trainer.channels_last`` values that give this run's precision
        and layout on a device of ``device_type``: what it resolved there, where it
        trained on that kind of device; else what its config asked for."""
        if self.precision is not None and self.device_type == device_type:
            return amp_option(self.precision), self.channels_last
        amp = self.config.get("amp", {}).get("name", "auto")
        return amp, self.config.get("trainer", {}).get("channels_last")


def refuse_untrusted(named: list[str], path: Path) -> None:
    """One line when a checkpoint names code of its own (``named``): it is data, and runs
    nothing its user did not allow with ``trust_code=true``."""
    if named:
        raise CheckpointError(
            f"checkpoint {path} names code that rebuilding it would run "
            f"({', '.join(named)}): if you trust the checkpoint and that code, run again "
            f"with trust_code=true"
        )


def rebuild_model(
    state: dict[str, Any], record: CheckpointRecord, path: Path, trust_code: bool = False
) -> nn.Module:
    """The checkpoint's model on the CPU with the weights its run tested: the average
    when it trained with ``ema=on`` (what it validated and kept), else the last step's.
    A model of the user's own is imported and called only with ``trust_code``."""
    if not trust_code:
        refuse_untrusted(record.model_code(), path)
    model = build_model(record.model_config, pretrained=False)  # its weights are here
    weights = state["ema"]["model"] if record.averaged else state["model"]
    load_model_weights(model, {**state, "model": weights}, path)
    return model
