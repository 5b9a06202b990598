"""Pass this machine's pip configuration into a local image build (buildah/podman).

    python3 scripts/host_pip.py DIR     # writes DIR/pip.conf, prints the build arguments

What ``pip config list`` reports (the global, user and site files, $PIP_CONFIG_FILE and the
PIP_* environment, in pip's order of precedence) is merged into one ``DIR/pip.conf``. Every
local path it names (find-links folders, ``file://`` indexes, the CA bundle, constraint files)
is mounted read-only under ``/run/host-pip`` for the build's RUN steps and rewritten to point
there; nothing of it is committed into the image. The build arguments, one per line:
``--build-arg=PIP_CONFIG_FILE=...`` (the Dockerfiles declare that ARG) and ``--volume=...``.
Nothing here names a package host: the build sees exactly what pip on this machine sees.
"""

from __future__ import annotations

import ast
import configparser
import io
import subprocess
import sys
from pathlib import Path

MOUNT_ROOT = "/run/host-pip"
# Keys a build must not inherit: they point at this machine's writable state.
SKIPPED = {"cache-dir", "log", "log-file", "src", "target", "prefix", "root", "user"}
# pip's precedence, lowest first: file sections, then the environment (":env:") over all of them.
ENV_SECTION = ":env:"


def parse_config_list(text: str) -> dict[str, dict[str, str]]:
    """``pip config list`` output (``section.key='value'`` lines) -> {section: {key: value}}."""
    sections: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, sep, raw = line.partition("=")
        section, dot, key = name.rpartition(".")
        if not sep or not dot:
            raise ValueError(f"pip config list: unexpected line {line!r}")
        sections.setdefault(section, {})[key] = ast.literal_eval(raw)
    return sections


def _mount_source(token: str) -> tuple[str, str] | None:
    """(local path to mount, the token rewritten to its mounted place), or None for a remote
    value. A ``file://…/simple`` index is mounted with its parent: static PEP 503 mirrors link
    their files as ``../../files/…``."""
    if token.startswith("file://"):
        path = token.removeprefix("file://")
        mount = str(Path(path).parent) if Path(path).name == "simple" else path
        return mount, f"file://{MOUNT_ROOT}{path}"
    if token.startswith("/") and Path(token).exists():
        return token, f"{MOUNT_ROOT}{token}"
    return None


def merge(sections: dict[str, dict[str, str]]) -> tuple[str, list[str]]:
    """One pip.conf with the environment's values in ``[global]`` (and removed from the other
    sections, which they override in pip), local paths rewritten under MOUNT_ROOT; and the
    sorted local paths to mount."""
    env = {k: v for k, v in sections.get(ENV_SECTION, {}).items() if k not in SKIPPED}
    merged: dict[str, dict[str, str]] = {}
    for section, values in sections.items():
        if section == ENV_SECTION:
            continue
        kept = {k: v for k, v in values.items() if k not in SKIPPED and k not in env}
        if kept:
            merged[section] = kept
    merged.setdefault("global", {}).update(env)
    mounts: set[str] = set()
    for values in merged.values():
        for key, value in values.items():
            tokens = []
            for token in value.split():
                found = _mount_source(token)
                if found:
                    mounts.add(found[0])
                    token = found[1]
                tokens.append(token)
            values[key] = " ".join(tokens)
    parser = configparser.ConfigParser(interpolation=None)
    for section in sorted(merged, key=lambda s: (s != "global", s)):
        parser[section] = merged[section]
    out = io.StringIO()
    parser.write(out)
    return out.getvalue(), sorted(_outermost(mounts))


def _outermost(paths: set[str]) -> set[str]:
    """Drop paths inside another one (one mount covers them)."""
    return {
        p for p in paths if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths)
    }


def build_arguments(folder: Path, config: str, mounts: list[str]) -> list[str]:
    """Write ``folder/pip.conf``; the buildah/podman arguments that use it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pip.conf").write_text(config)
    args = [
        f"--build-arg=PIP_CONFIG_FILE={MOUNT_ROOT}/config/pip.conf",
        f"--volume={folder.resolve()}:{MOUNT_ROOT}/config:ro",
    ]
    args += [f"--volume={m}:{MOUNT_ROOT}{m}:ro" for m in mounts]
    return args


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    config, mounts = merge(parse_config_list(listing))
    print("\n".join(build_arguments(Path(argv[0]), config, mounts)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
