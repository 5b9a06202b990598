"""Ingest from ``s3://bucket/prefix`` on a real S3 server (SeaweedFS): the same dataset as from
the local folder, the same checks and messages, one clear error for a missing bucket or prefix;
on a cluster an empty source is an error and the generated dataset is asked for by name."""

from __future__ import annotations

from pathlib import Path

import pytest
from minio import Minio

from components import ingest_task
from conftest import REPO, write_whu_layout
from hsissl.config import load_config
from hsissl.data.scenes import DataContractError
from hsissl.stages import ingest

SCENES = {"tr": 3, "va": 1, "ts": 1}


def _client(s3_server) -> Minio:
    return Minio(s3_server.endpoint.removeprefix("http://"), access_key=s3_server.access_key,
                 secret_key=s3_server.secret_key, secure=False, region="us-east-1")  # fmt: skip


def _upload(s3_server, folder: Path, bucket: str, prefix: str) -> None:
    client = _client(s3_server)
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.fput_object(bucket, f"{prefix}/{path.relative_to(folder).as_posix()}", str(path))


def _cfg(tmp_path: Path, source: str, store: str):
    return load_config(REPO / "configs" / "tiny.yaml", [
        f"run_dir={tmp_path / 'run'}", f"data.source={source}", "data.scene_size=128",
        "data.shard_tiles=5", "tracking.uri=", f"storage.uri={store}", "data.readers=2"])  # fmt: skip


@pytest.fixture
def whu_in_s3(s3_bucket: str, s3_server, tmp_path: Path) -> tuple[Path, str]:
    """The same small WHU-OHS folder, locally and uploaded to ``s3://<bucket>/WHU-OHS``."""
    folder = write_whu_layout(tmp_path / "whu", SCENES)
    bucket = s3_bucket.removeprefix("s3://")
    _upload(s3_server, folder, bucket, "WHU-OHS")
    return folder, f"{s3_bucket}/WHU-OHS"


def test_ingest_from_s3_equals_ingest_of_the_same_folder(whu_in_s3, tmp_path: Path) -> None:
    folder, source = whu_in_s3
    local = ingest.run(_cfg(tmp_path, str(folder), str(tmp_path / "store-a"))).manifest
    remote = ingest.run(_cfg(tmp_path, source, str(tmp_path / "store-b"))).manifest
    assert remote["source"] == source
    assert remote["splits"] == local["splits"]  # tiles, scenes, class pixels, shard sha256s
    assert [f["sha256"] for s in remote["splits"].values() for shard in s["shards"]
            for f in shard["files"].values()]  # fmt: skip
    assert remote["normalizer"] == local["normalizer"]
    assert remote["band_stats"] == local["band_stats"]
    # the same objects again: the committed dataset is reused (fingerprint by size and ETag)
    again = ingest.run(_cfg(tmp_path, source, str(tmp_path / "store-b")))
    assert again.reused and again.manifest["fingerprint"] == remote["fingerprint"]


def test_s3_scenes_get_the_folders_checks_and_messages(whu_in_s3, s3_server, tmp_path) -> None:
    folder, source = whu_in_s3
    bucket, _, prefix = source.removeprefix("s3://").partition("/")
    client = _client(s3_server)
    client.remove_object(bucket, f"{prefix}/va/label/T0003.tif")  # an image without its label
    client.fput_object(bucket, f"{prefix}/tr/label/T0000.tif", str(folder / "tr/image/T0001.tif"))
    with pytest.raises(DataContractError) as err:
        ingest.run(_cfg(tmp_path, source, str(tmp_path / "store")))
    text = str(err.value)
    assert (f"{source}/va/image/T0003.tif: label file: found none, expected "
            f"{source}/va/label/T0003.tif") in text  # fmt: skip
    assert f"{source}/tr/label/T0000.tif: band count: found 32, expected 1" in text
    assert not (tmp_path / "store" / "datasets").exists()  # nothing written
    listed = ingest.run(_cfg(tmp_path, source, str(tmp_path / "store")), report=True)
    assert {(v.file, v.field) for v in listed.violations} >= {
        (f"{source}/va/image/T0003.tif", "label file"),
        (f"{source}/tr/label/T0000.tif", "band count"), (f"{source}/tr/label/T0000.tif", "dtype")}  # fmt: skip


@pytest.mark.parametrize(
    ("where", "message"),
    [("missing-bucket", "bucket: found no such bucket at"),
     ("missing-prefix", "dataset root: found no objects under this prefix at")],
)  # fmt: skip
def test_a_missing_bucket_or_prefix_is_one_clear_error(whu_in_s3, tmp_path, where, message):
    _, source = whu_in_s3
    bucket = source.removeprefix("s3://").partition("/")[0]
    wrong = (
        "s3://no-such-bucket-hsissl/WHU-OHS" if where == "missing-bucket" else f"s3://{bucket}/nope"
    )
    with pytest.raises(DataContractError) as err:
        ingest.run(_cfg(tmp_path, wrong, str(tmp_path / "store")))
    assert len(err.value.violations) == 1
    assert message in str(err.value) and wrong.rsplit("/", 1)[0] in str(err.value)


def test_on_a_cluster_an_empty_source_is_an_error_saying_what_to_pass(tmp_path, monkeypatch):
    """KFP_POD_NAME: set in every step's executor container by the KFP backend 2.14-2.17
    (backend/src/v2/compiler/argocompiler/common.go, commonEnvs), not by kfp.local."""
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # any pod, e.g. a notebook
    monkeypatch.delenv("KFP_POD_NAME", raising=False)
    ingest_task.check_source("")  # kfp.local in a pod: "" is still the generated dataset
    monkeypatch.setenv("KFP_POD_NAME", "hsissl-abc-system-container-impl-1")
    ingest_task.check_source("generated")
    with pytest.raises(ValueError, match=r"source is empty.*s3://<bucket>/<prefix>.*generated"):
        ingest_task.ingest("", "", [f"run_dir={tmp_path}"], str(tmp_path / "store"), "", None)
    assert not (tmp_path / "store").exists()


def test_a_claim_on_a_pipeline_compiled_without_one_is_an_error() -> None:
    ingest_task.check_claim("", False)
    ingest_task.check_claim("whu-data", True)
    with pytest.raises(ValueError, match=r"data_pvc='whu-data'.*compiled without --data-pvc"):
        ingest_task.check_claim("whu-data", False)
