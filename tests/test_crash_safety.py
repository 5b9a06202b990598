"""A committed dataset or checkpoint survives a crashed object store and concurrent writers.

Real SeaweedFS 4.48 (``weed mini``, conftest_s3.KillableS3) killed with SIGKILL at chosen
object operations of a re-ingest / a longer pretraining run, then restarted on the same data.
The kill points are counted operations of the writer (``KillAt``), not sleeps. The figures
these tests print (``-s``) are the ones in docs/architecture.md.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from hsissl.config import load_config
from hsissl.data.shards import ShardDataset
from hsissl.pretrain import checkpoint
from hsissl.pretrain.mae import MAERecipe
from hsissl.pretrain.trainer import pretrain
from hsissl.stages import ingest
from hsissl.storage import Lease, LeaseHeld, S3Storage, StorageError, open_storage

REPO = Path(__file__).resolve().parents[1]
# Every S3Storage call that changes the bucket (a kill point is the n-th of them).
MUTATING = ("put_bytes", "put_file", "put_if_absent", "put_if_tag", "_delete_keys")
FAST_FAIL_ENV = {"HSISSL_S3_RETRIES": "1", "HSISSL_S3_CONNECT_TIMEOUT": "2",
                 "HSISSL_S3_TIMEOUT": "5"}  # fmt: skip


class KillAt:
    """Counts the mutating S3 operations of this process; just before the ``n``-th one it
    SIGKILLs the S3 server (``n=None``: only count)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, s3, n: int | None) -> None:
        self.count, self.n, self.killed_at = 0, n, None
        for name, value in FAST_FAIL_ENV.items():  # the faulted run fails fast; reruns do not
            monkeypatch.setenv(name, value)
        lock = threading.Lock()
        for name in MUTATING:
            original = getattr(S3Storage, name)

            def counted(store, *args, _original=original, **kwargs):
                with lock:
                    self.count += 1
                    if self.count == self.n:
                        s3.kill()
                        self.killed_at = time.monotonic()
                return _original(store, *args, **kwargs)

            monkeypatch.setattr(S3Storage, name, counted)


def _points(total: int, wanted: int) -> list[int]:
    """``wanted`` kill points spread over operations 1..total (first and last included)."""
    return sorted({int(round(x)) for x in np.linspace(1, total, wanted)})


def _check_dataset(uri: str, cache: Path) -> dict:
    """Open the committed dataset with sha256 checks of every shard; its manifest."""
    dataset = ShardDataset(uri, cache_dir=cache, verify=True)
    for split in dataset.splits:
        view = dataset.split(split)
        assert len(view) == dataset.manifest["splits"][split]["tiles"]
        view.get(list(range(len(view))))  # every tile readable
    return dataset.manifest


@pytest.fixture
def s3_cfgs(killable_s3, tiny_cfg, tmp_path, monkeypatch):
    """Two ingest configs of one dataset name in a bucket of the killable server, differing
    in shard size (so their datasets differ in every shard)."""
    monkeypatch.setenv("HSISSL_CACHE", str(tmp_path / "cache"))
    uri = f"s3://hsissl-{uuid.uuid4().hex[:12]}/store"
    base = [f"run_dir={tiny_cfg.run_dir}", f"data.source={tiny_cfg.data.source}",
            "data.scene_size=128", f"storage.uri={uri}", "tracking.uri="]  # fmt: skip
    return [load_config(REPO / "configs" / "tiny.yaml", [*base, f"data.shard_tiles={n}"])
            for n in (5, 3)]  # fmt: skip


@pytest.mark.slow
def test_s3_killed_during_reingest_never_loses_the_committed_dataset(
    killable_s3, s3_cfgs, monkeypatch, tmp_path
) -> None:
    first = ingest.run(s3_cfgs[0])
    uri = first.dataset_uri
    counts = []
    for cfg in (s3_cfgs[1], s3_cfgs[0]):  # mutating operations of a re-ingest with each setting
        with monkeypatch.context() as m:
            counter = KillAt(m, killable_s3, None)
            ingest.run(cfg)
        counts.append(counter.count)
    points = _points(min(counts) - 1, 12)  # (the last, releasing the lease, may not come)
    current, lost, seconds, faults = 0, 0, [], 0
    for trial, n in enumerate(points):
        target = 1 - current
        before = _check_dataset(uri, tmp_path / f"c{trial}a")["fingerprint"]
        with monkeypatch.context() as m:
            kill = KillAt(m, killable_s3, n)
            start = time.monotonic()
            try:
                ingest.run(s3_cfgs[target])
                failed = False
            except StorageError as exc:
                failed = True
                assert "no usable answer from the S3 endpoint" in str(exc)
                seconds.append(time.monotonic() - (kill.killed_at or start))
        if kill.killed_at is None:  # this run made fewer operations (no fault: still checked)
            print(f"kill point {n} not reached")
        else:
            faults += 1
            killable_s3.start()
        try:
            after = _check_dataset(uri, tmp_path / f"c{trial}b")
        except Exception as exc:  # counted, then reported
            lost += 1
            print(f"kill point {n}: dataset unreadable: {exc}")
            continue
        rerun = ingest.run(s3_cfgs[target])  # the rerun succeeds every time
        assert _check_dataset(uri, tmp_path / f"c{trial}c")["config"]["shard_tiles"] == (
            s3_cfgs[target].data.shard_tiles
        )
        assert rerun.manifest["fingerprint"] != before
        # After the fault: the old dataset, or the new one if the fault came after its commit
        # point (a failed clean-up) -- never neither, never a mix (sha256 checked above).
        assert after["fingerprint"] in (before, rerun.manifest["fingerprint"])
        if failed and after["fingerprint"] != before:
            print(f"kill point {n}: failed after the commit point (clean-up)")
        current = target
    budget = 5 * (1 + 1) + 5  # HSISSL_S3_TIMEOUT x (retries + 1) + a few s
    print(f"\nre-ingest: {counts} mutating S3 operations; faults injected: {faults} "
          f"(points {points}); datasets lost: {lost}; time to the error: max "
          f"{max(seconds):.2f} s, median {sorted(seconds)[len(seconds) // 2]:.2f} s")  # fmt: skip
    assert lost == 0
    assert faults >= 10 and max(seconds) < budget


FROZEN_WRITER = textwrap.dedent(
    """
    import os, signal, sys, time
    from hsissl.storage import S3Storage
    from hsissl.cli import main

    n, pid, how = int(os.environ["KILL_AT"]), int(os.environ["S3_PID"]), os.environ["HOW"]
    count = 0
    def wrap(original):
        def counted(*args, **kwargs):
            global count
            count += 1
            if count == n:
                os.killpg(pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
                print(f"KILLED {time.time()}", file=sys.stderr, flush=True)
            return original(*args, **kwargs)
        return counted
    for name in ("put_bytes", "put_file", "put_if_absent", "put_if_tag", "_delete_keys"):
        setattr(S3Storage, name, wrap(getattr(S3Storage, name)))
    code = main(sys.argv[1:])  # the error line is printed by now
    print(f"RETURNED {time.time()}", file=sys.stderr, flush=True)
    sys.exit(code)
    """
)


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_store_failure_mid_ingest_is_one_clear_line_within_the_timeouts(
    killable_s3, s3_cfgs, tmp_path, how
) -> None:
    """A killed (refuses) or frozen (SIGSTOP: never answers) server during staging: the CLI
    says so in one line within HSISSL_S3_TIMEOUT x (retries + 1) + a few s; no traceback."""
    ingest.run(s3_cfgs[0])
    timeout, retries = 2.0, 1
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
           "KILL_AT": "6", "S3_PID": str(killable_s3.proc.pid), "HOW": how,
           "HSISSL_S3_TIMEOUT": str(timeout), "HSISSL_S3_RETRIES": str(retries)}  # fmt: skip
    cfg = s3_cfgs[1]
    args = ["ingest", "--config", str(REPO / "configs/tiny.yaml"), f"run_dir={cfg.run_dir}",
            f"data.source={cfg.data.source}", "data.scene_size=128", "data.shard_tiles=3",
            f"storage.uri={cfg.storage.uri}", "tracking.uri="]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", FROZEN_WRITER, *args], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    ended = time.time()
    killable_s3.stop()  # (SIGCONT first if frozen)
    killable_s3.start()
    assert proc.returncode == 2, proc.stderr[-3000:]
    killed = float(re.search(r"KILLED ([0-9.]+)", proc.stderr).group(1))
    seconds = float(re.search(r"RETURNED ([0-9.]+)", proc.stderr).group(1)) - killed
    exited = ended - killed
    lines = [line for line in proc.stderr.splitlines() if "hsissl ingest: error" in line]
    assert len(lines) == 1 and lines[0].startswith("hsissl ingest: error: "), proc.stderr
    assert "no usable answer from the S3 endpoint" in lines[0]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Retrying" not in proc.stderr  # no retry warning per request (720 of them before)
    assert seconds < timeout * (retries + 1) + 5, seconds
    print(
        f"\n{how}: clear error {seconds:.1f} s after the fault (process gone after {exited:.1f} s)"
    )
    assert _check_dataset(s3_cfgs[0].storage.uri + "/datasets/whu-ohs", tmp_path / "c")[
        "config"]["shard_tiles"] == 5  # fmt: skip


# ----------------------------------------------------------------------------- checkpoints


def _mae_cfg(run_dir: Path, uri: str, steps: int):
    overrides = {
        "run_dir": run_dir, "synthetic.scenes": "{tr: 4, va: 1, ts: 1}", "synthetic.size": 128,
        "data.scene_size": 128, "pretrain.batch_size": 16, "pretrain.max_steps": steps,
        "pretrain.ckpt_every": 2, "pretrain.log_every": 1, "pretrain.knn_tiles": 0,
        "pretrain.deterministic": "true", "pretrain.loader_threads": 1, "pretrain.name": "ck",
        "mae.model": "mae_vit_tiny_patch8_64", "tracking.uri": "", "storage.uri": uri,
    }  # fmt: skip
    return load_config(REPO / "configs" / "tiny.yaml", [f"{k}={v}" for k, v in overrides.items()])


def _check_checkpoint(uri: str) -> int:
    """Load the committed checkpoint (encoder record and train state); its train step."""
    store = open_storage(f"{uri}/checkpoints/ck")
    encoder, _, record = checkpoint.load_model(f"{uri}/checkpoints/ck/encoder.pt")
    state = torch.load(io.BytesIO(store.get_bytes("train.pt")), weights_only=False)
    history = json.loads(store.get_bytes("history.json"))
    assert [h["step"] for h in history] == list(range(1, state["step"] + 1))
    assert record["step"] <= state["step"]
    return state["step"]


@pytest.mark.slow
def test_s3_killed_while_a_longer_pretraining_overwrites_the_checkpoint(
    killable_s3, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("HSISSL_CACHE", str(tmp_path / "cache"))
    uri = f"s3://hsissl-{uuid.uuid4().hex[:12]}/store"
    run_dir = tmp_path / "run"
    ingest.run(_mae_cfg(run_dir, uri, 4))
    pretrain(_mae_cfg(run_dir, uri, 4), MAERecipe, "pretrain-mae")
    assert _check_checkpoint(uri) == 4
    with monkeypatch.context() as m:  # operations of a run from step 4 to 8 (on a copy)
        counter = KillAt(m, killable_s3, None)
        pretrain(_mae_cfg(run_dir, uri, 8), MAERecipe, "pretrain-mae")
    points = _points(counter.count - 1, 11)
    steps, lost, faults = 8, 0, 0
    for trial, n in enumerate(points):
        longer = steps + 4
        with monkeypatch.context() as m:
            kill = KillAt(m, killable_s3, n)
            try:
                pretrain(_mae_cfg(run_dir, uri, longer), MAERecipe, "pretrain-mae")
            except StorageError:
                pass
        if kill.killed_at is None:
            print(f"kill point {n} not reached")
        else:
            faults += 1
            killable_s3.start()
        try:
            step = _check_checkpoint(uri)
        except Exception as exc:
            lost += 1
            print(f"kill point {n}: checkpoint unreadable: {exc}")
            continue
        assert steps <= step <= longer, (trial, step)
        pretrain(_mae_cfg(run_dir, uri, longer), MAERecipe, "pretrain-mae")  # rerun: resumes
        assert _check_checkpoint(uri) == longer
        steps = longer
    print(f"\npretraining +4 steps: {counter.count} mutating S3 operations; faults injected: "
          f"{faults} (points {points}); checkpoints lost: {lost}")  # fmt: skip
    assert lost == 0 and faults >= 10


# ----------------------------------------------------------------------------- concurrency


def test_second_writer_of_a_name_fails_at_once_local(tmp_path: Path) -> None:
    store = open_storage(tmp_path / "store")
    with Lease(store, "datasets/ds"):
        start = time.monotonic()
        with pytest.raises(LeaseHeld, match=r"another ingest of 'ds' is running \(owner .*, "
                                            r"since 20\d\d-"):  # fmt: skip
            with store.transaction("datasets/ds") as tx:
                tx.commit({"manifest.json": b"{}"})
        assert time.monotonic() - start < 2
    with store.transaction("datasets/ds") as tx:  # released: the next one gets it
        tx.commit({"manifest.json": b"{}"})


def test_an_expired_lease_is_taken_over(tmp_path: Path, monkeypatch) -> None:
    store = open_storage(tmp_path / "store")
    record = {"owner": "someone@elsewhere pid 1", "host": "elsewhere", "pid": 1, "token": "t",
              "started": "2026-01-01T00:00:00+00:00", "expires": time.time() + 1.5}  # fmt: skip
    store.put_bytes("checkpoints/ck/_lease.json", json.dumps(record).encode())
    with pytest.raises(LeaseHeld, match="another pretraining of 'ck' is running"):
        Lease(store, "checkpoints/ck").acquire()
    time.sleep(2)
    with store.transaction("checkpoints/ck") as tx:  # expired: taken over
        tx.commit({"train.pt": b"x"})
    assert store.get_bytes("checkpoints/ck/train.pt") == b"x"


TOGETHER = textwrap.dedent(
    """
    import sys, time
    from hsissl.cli import main
    start_at = float(sys.argv[1])
    while time.time() < start_at:  # imports done: start together
        time.sleep(0.001)
    began = time.time()
    code = main(sys.argv[2:])
    print(f"TOOK {time.time() - began} BEGAN {began}", file=sys.stderr, flush=True)
    sys.exit(code)
    """
)


@pytest.mark.slow
def test_two_ingests_of_one_name_started_together_on_s3(killable_s3, s3_cfgs, tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    uri = s3_cfgs[0].storage.uri
    wins, waits, spreads, winner_took = {"first": 0, "second": 0}, [], [], []
    cfg = s3_cfgs[0]
    for trial in range(10):
        # Settings neither the committed dataset nor each other have: both must write.
        tiles = {"first": 2 + 2 * trial, "second": 3 + 2 * trial}
        start_at = time.time() + 15  # both imported by then (2 busy cores)
        procs = {}
        for who, n in tiles.items():
            args = ["ingest", "--config", str(REPO / "configs/tiny.yaml"),
                    f"run_dir={tmp_path / f'run{trial}-{who}'}", f"data.source={cfg.data.source}",
                    "data.scene_size=128", f"data.shard_tiles={n}", f"storage.uri={uri}",
                    "tracking.uri="]  # fmt: skip
            procs[who] = subprocess.Popen(
                [sys.executable, "-c", TOGETHER, str(start_at), *args], env=env, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        results = {}
        for who, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            results[who] = (proc.returncode, out, err, time.time())
        winners = [t for t, r in results.items() if r[0] == 0]
        assert len(winners) == 1, {t: (r[0], r[2][-1500:]) for t, r in results.items()}
        (loser,) = [t for t in results if t not in winners]
        code, _, err, _ = results[loser]
        assert code == 75, err[-2000:]
        assert re.search(r"another ingest of 'whu-ohs' is running \(owner .+, since 20\d\d-", err)
        took = {w: float(re.search(r"TOOK ([0-9.]+)", r[2]).group(1)) for w, r in results.items()}
        waits.append(took[loser])
        winner_took.append(took[winners[0]])
        # At once: before the winner is done, in the time it takes to import and check inputs.
        assert took[loser] < took[winners[0]] and took[loser] < 15, took
        began = [float(re.search(r"BEGAN ([0-9.]+)", r[2]).group(1)) for r in results.values()]
        spreads.append(abs(began[0] - began[1]))
        manifest = _check_dataset(f"{uri}/datasets/whu-ohs", tmp_path / f"c{trial}")
        assert manifest["config"]["shard_tiles"] == tiles[winners[0]]  # the winner's dataset
        wins[winners[0]] += 1
    print(
        f"\n10 trials of two ingests started together: wins by writer {wins}; the loser "
        f"failed {min(waits):.1f}-{max(waits):.1f} s after it started (imports included), the "
        f"winner took {min(winner_took):.1f}-{max(winner_took):.1f} s; starts at most "
        f"{max(spreads):.2f} s apart"
    )
