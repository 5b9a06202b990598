"""scripts/host_pip.py: this machine's pip configuration, passed into a local image build."""

from __future__ import annotations

import configparser
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("host_pip", REPO / "scripts" / "host_pip.py")
host_pip = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host_pip)


def test_local_paths_are_mounted_and_rewritten_and_the_environment_wins(tmp_path: Path):
    wheels = tmp_path / "wheels"
    (tmp_path / "mirror" / "simple").mkdir(parents=True)
    wheels.mkdir()
    listing = "\n".join([
        f"global.extra-index-url='file://{tmp_path}/mirror/simple https://pypi.example/simple'",
        "global.timeout='30'",
        "install.timeout='60'",
        f"global.cache-dir='{tmp_path}/cache'",
        f":env:.find-links='{wheels}'",
        ":env:.timeout='180'",
    ])  # fmt: skip
    config, mounts = host_pip.merge(host_pip.parse_config_list(listing))
    parsed = configparser.ConfigParser(interpolation=None)
    parsed.read_string(config)
    root = host_pip.MOUNT_ROOT
    assert parsed["global"]["extra-index-url"] == (
        f"file://{root}{tmp_path}/mirror/simple https://pypi.example/simple"
    )
    assert parsed["global"]["find-links"] == f"{root}{wheels}"
    # PIP_TIMEOUT overrides [install] in pip, so the merged file must not keep [install]'s value
    assert parsed["global"]["timeout"] == "180" and not parsed.has_section("install")
    assert "cache-dir" not in parsed["global"]  # this machine's writable state stays out
    # a static index is mounted with its parent (its pages link ../../files/...)
    assert mounts == sorted([str(tmp_path / "mirror"), str(wheels)])
    args = host_pip.build_arguments(tmp_path / "out", config, mounts)
    assert args[0] == f"--build-arg=PIP_CONFIG_FILE={root}/config/pip.conf"
    assert f"--volume={wheels}:{root}{wheels}:ro" in args
    assert (tmp_path / "out" / "pip.conf").read_text() == config


def test_a_path_inside_another_mount_is_not_mounted_twice(tmp_path: Path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    listing = f"global.find-links='{tmp_path}/a {tmp_path}/a/b'"
    _, mounts = host_pip.merge(host_pip.parse_config_list(listing))
    assert mounts == [str(tmp_path / "a")]
