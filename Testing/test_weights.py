"""Checkpoint format: round trip, SHA-256 verification and clear errors for bad files."""

from __future__ import annotations

import torch
import pytest

from unifuse.config import ModelConfig, tiny
from unifuse.errors import ConfigError, WeightsError
from unifuse.train.configs import TrainConfig, get_train_config
from unifuse.weights import checksum_path, load_checkpoint, save_checkpoint, sha256_of


def _state():
    g = torch.Generator().manual_seed(0)
    return {"layer.weight": torch.randn(3, 4, generator=g), "layer.bias": torch.zeros(3)}


def test_round_trip_keeps_config_tensors_and_metadata(tmp_path):
    path = tmp_path / "ckpt.pt"
    digest = save_checkpoint(path, tiny(), _state(), {"trained": True, "steps": 12})
    ckpt = load_checkpoint(path)
    assert ckpt.config == tiny()
    assert ckpt.metadata["steps"] == 12 and ckpt.metadata["trained"] is True
    assert "unifuse_version" in ckpt.metadata
    assert torch.equal(ckpt.state_dict["layer.weight"], _state()["layer.weight"])
    assert ckpt.sha256 == digest == sha256_of(path)
    assert checksum_path(path).read_text(encoding="utf-8").split()[0] == digest
    assert ckpt.model_id.startswith("unifuse-tiny-")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_missing_checksum_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, tiny(), _state())
    checksum_path(path).unlink()
    with pytest.raises(WeightsError, match=r"\.sha256"):
        load_checkpoint(path)


def test_modified_file_fails_checksum(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, tiny(), _state())
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupt or was modified"):
        load_checkpoint(path)


def test_truncated_file_with_matching_checksum_is_unreadable(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, tiny(), _state())
    path.write_bytes(path.read_bytes()[:100])
    checksum_path(path).write_text(f"{sha256_of(path)}  {path.name}\n", encoding="utf-8")
    with pytest.raises(WeightsError, match="cannot be read"):
        load_checkpoint(path)


def test_foreign_pickle_is_not_executed(tmp_path):
    """weights_only loading refuses arbitrary objects: a checkpoint cannot run code."""

    path = tmp_path / "evil.pt"
    torch.save({"format": "unifuse-checkpoint", "obj": ModelConfig()}, path)  # a class instance, not plain data
    checksum_path(path).write_text(f"{sha256_of(path)}  {path.name}\n", encoding="utf-8")
    with pytest.raises(WeightsError, match="cannot be read"):
        load_checkpoint(path)


def test_other_format_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": _state()}, path)
    checksum_path(path).write_text(f"{sha256_of(path)}  {path.name}\n", encoding="utf-8")
    with pytest.raises(WeightsError, match="not a UniFuse checkpoint"):
        load_checkpoint(path)


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format": "unifuse-checkpoint", "format_version": 99, "config": tiny().to_dict(),
                "state_dict": _state()}, path)
    checksum_path(path).write_text(f"{sha256_of(path)}  {path.name}\n", encoding="utf-8")
    with pytest.raises(WeightsError, match="upgrade unifuse"):
        load_checkpoint(path)


def test_shipped_weights_load_into_the_cpu_network():
    from unifuse.config import cpu
    from unifuse.model import build_model
    from unifuse.weights import shipped_weights_path

    path = shipped_weights_path()
    assert path is not None, "the extension ships UniFuseSlicer/Resources/Models/unifuse_default.pt"
    ckpt = load_checkpoint(path)
    assert ckpt.config == cpu()  # with the restoration output and the cell-centred FA head (cpu_real run)
    build_model(ckpt.config).load_state_dict(ckpt.state_dict)  # strict: every tensor matches


def test_configs_of_old_checkpoints_drop_an_empty_extra_and_refuse_a_used_one():
    assert ModelConfig.from_dict({**tiny().to_dict(), "extra": {}}) == tiny()
    with pytest.raises(ValueError, match="extra"):
        ModelConfig.from_dict({**tiny().to_dict(), "extra": {"key": 1}})


@pytest.mark.parametrize("config_type, fields", [(ModelConfig, tiny().to_dict()),
                                                 (TrainConfig, get_train_config("tiny").to_dict())])
def test_model_and_training_configs_refuse_unknown_fields_with_the_same_error(config_type, fields):
    with pytest.raises(ConfigError, match="no_such_field"):
        config_type.from_dict({**fields, "no_such_field": 1})
