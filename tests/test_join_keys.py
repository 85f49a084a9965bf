"""The join token's keys and the checkpoint fingerprint, in-process."""
import json
import shutil

import pytest

pytest.importorskip("zmq")  # a dependency of the package; absent on bare GPU images

from helpers.models import tiny_model  # noqa: E402
from kevlarflow.deploy.config import DeploymentConfig  # noqa: E402
from kevlarflow.deploy.join import JoinKeys, new_token  # noqa: E402
from kevlarflow.model import fingerprint  # noqa: E402
from kevlarflow.model.make_model import make_model  # noqa: E402


def test_a_token_gives_the_same_keys_everywhere_and_another_token_others():
    token = new_token()
    assert len(token) >= 32 and token != new_token()
    assert JoinKeys(token).worker_public == JoinKeys(token).worker_public
    assert JoinKeys(token).worker_public != JoinKeys(token + "x").worker_public
    assert JoinKeys("").worker_public != JoinKeys(token).worker_public
    assert token not in repr(JoinKeys(token))
    with pytest.raises(TypeError, match="str"):
        JoinKeys(b"bytes")


def test_a_configured_token_is_long_enough_and_never_printed():
    with pytest.raises(ValueError, match="at least 16"):
        DeploymentConfig(join_token="short").validate()
    config = DeploymentConfig(join_token="a-long-enough-join-token")
    config.validate()
    assert "a-long-enough-join-token" not in repr(config)


def test_the_fingerprint_tells_checkpoints_apart_and_says_how(tmp_path):
    base = fingerprint.fingerprint(tiny_model())
    assert fingerprint.fingerprint(tiny_model()) == base
    same = json.loads(fingerprint.encode(base))
    assert fingerprint.differences(base, same) == []
    # Another training run of the same shapes: only the weights differ.
    make_model(tmp_path / "seed1", preset="tiny", seed=1)
    other = fingerprint.fingerprint(tmp_path / "seed1")
    assert fingerprint.differences(base, other) == [
        "the weight files differ (their safetensors headers or sizes, or their data)"]
    # Another shape: the config says which field.
    shutil.copytree(tiny_model(), tmp_path / "wide")
    config = json.loads((tmp_path / "wide" / "config.json").read_text())
    config["rms_norm_eps"] = 0.125
    (tmp_path / "wide" / "config.json").write_text(json.dumps(config))
    assert fingerprint.differences(base, fingerprint.fingerprint(tmp_path / "wide")) == [
        f"rms_norm_eps {base['config']['rms_norm_eps']!r} here, 0.125 there"]
    with pytest.raises(ValueError, match="safetensors"):
        (tmp_path / "empty").mkdir()
        shutil.copy(tmp_path / "wide" / "config.json", tmp_path / "empty")
        fingerprint.fingerprint(tmp_path / "empty")
