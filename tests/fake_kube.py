"""A loopback Kubernetes API that plays the Training Operator v1 (PyTorchJob) and the Kubeflow
Trainer v2 (TrainJob), for the launch-pytorchjob tests.

No kube-apiserver is installable here (no envtest/apiserver binaries on PyPI), so a small
HTTP server implements what the launcher uses: API discovery (``GET /apis/<group>/<version>``,
404 for a group that is not installed), and POST/GET/DELETE on
``/apis/<group>/<version>/namespaces/<ns>/<plural>[/<name>]``; plus the operator's part: it
runs the posted job's own command (``torchrun -m hsissl.cli <stage> …``, one process)
in-process, which writes the encoder into the artifact store, and reports the job's
conditions. The real ``kubernetes`` client talks to it.

Conditions follow each operator's types: PyTorchJob ``Created``/``Running``/``Succeeded``/
``Failed`` (training-operator v1.9, pkg/apis/kubeflow.org/v1/common_types.go JobConditionType);
TrainJob ``Complete``/``Failed``/``Suspended`` (kubeflow/trainer v2.3.0,
pkg/apis/trainer/v1alpha1/trainjob_types.go; no Created/Running conditions).
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

PYTORCHJOB = ("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob")
TRAINJOB = ("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob")
KINDS = {"pytorchjob": PYTORCHJOB, "trainjob": TRAINJOB}
SUCCEEDED = {"pytorchjob": "Succeeded", "trainjob": "Complete"}
JOBS_PATH = re.compile(r"^/apis/([^/]+)/([^/]+)/namespaces/([^/]+)/([^/]+?)(?:/([^/]+))?$")
DISCOVERY_PATH = re.compile(r"^/apis/([^/]+)/([^/]+)$")


def condition(kind: str, reason: str = "", message: str = "") -> dict[str, str]:
    return {"type": kind, "status": "True", "reason": reason or kind,
            "message": message or f"job is {kind.lower()}."}  # fmt: skip


def command_of(job: dict[str, Any]) -> list[str]:
    """The command every node of ``job`` runs (PyTorchJob Master replica or TrainJob trainer)."""
    if job["kind"] == "TrainJob":
        return job["spec"]["trainer"]["command"]
    (container,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    return container["command"]


class FakeOperator:
    """The Kubernetes API subset the launcher uses, plus the operators' part.

    ``served``: the job APIs installed ("pytorchjob", "trainjob"). ``outcome`` of a created
    job: "train" (run its command, then success or Failed), "succeed" (at once), "fail" (at
    once, with ``failure``) or "hang" (running forever). ``refuse``: an HTTP status every
    create gets instead (``refusal``: its message).
    """

    def __init__(self, served: tuple[str, ...] = ("pytorchjob",)) -> None:
        self.served = set(served)
        self.jobs: dict[str, dict[str, Any]] = {}  # "<plural>/<ns>/<name>" -> job
        self.requests: list[tuple[str, str, int]] = []  # (method, key or path, HTTP status)
        self.queries: list[dict[str, list[str]]] = []  # query parameters of every POST
        self.posted: list[dict[str, Any]] = []
        self.outcome = "train"
        self.refuse = 0
        self.refusal = ""
        self.failure = ("BackoffLimitExceeded", "the job reached its backoff limit")
        self.lock = threading.Lock()
        self.host = ""

    @staticmethod
    def key(job: dict[str, Any]) -> str:
        plural = next(k[2] for k in KINDS.values() if job["kind"] == k[3])
        return f"{plural}/{job['metadata'].get('namespace', 'default')}/{job['metadata']['name']}"

    # -- the operator's part ----------------------------------------------------------
    def add(self, job: dict[str, Any], *conditions: dict[str, str]) -> str:
        """Put ``job`` in the store as if created earlier; returns its key."""
        first = [condition("Created")] if job["kind"] == "PyTorchJob" else []
        job.setdefault("status", {})["conditions"] = [*first, *conditions]
        self.jobs[self.key(job)] = job
        return self.key(job)

    def set(self, key: str, cond: dict[str, str]) -> None:
        with self.lock:
            if key in self.jobs:
                self.jobs[key]["status"]["conditions"].append(cond)

    def succeeded(self, job: dict[str, Any]) -> dict[str, str]:
        return condition("Succeeded" if job["kind"] == "PyTorchJob" else "Complete")

    def _run(self, key: str, job: dict[str, Any]) -> None:
        from hsissl.cli import main

        command = command_of(job)
        assert command[:3] == ["torchrun", "-m", "hsissl.cli"], command
        if job["kind"] == "PyTorchJob":
            self.set(key, condition("Running"))
        code = main(command[3:])  # the node's module, as torchrun runs it (one process)
        self.set(key, self.succeeded(job) if code == 0 else
                 condition("Failed", "ExitCode", f"node 0 exited with code {code}"))  # fmt: skip

    def created(self, key: str, job: dict[str, Any]) -> None:
        self.add(job)
        if self.outcome == "train":
            threading.Thread(target=self._run, args=(key, job), daemon=True).start()
        elif self.outcome == "succeed":
            self.set(key, self.succeeded(job))
        elif self.outcome == "fail":
            self.set(key, condition("Failed", *self.failure))
        elif job["kind"] == "PyTorchJob":
            self.set(key, condition("Running"))

    # -- the API server's part --------------------------------------------------------
    def handler(self) -> type[BaseHTTPRequestHandler]:
        operator = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code: int, body: dict[str, Any], key: str) -> None:
                operator.requests.append((self.command, key, code))
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, key: str, message: str = "") -> None:
                body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                        "reason": reason, "message": message or f'"{key}" {reason}'}  # fmt: skip
                self._reply(code, body, key)

            def _route(self) -> tuple[str, str | None] | None:
                """(store key prefix "<plural>/<ns>", name) of a served job path; else answers
                discovery or 404 and returns None."""
                path = urlsplit(self.path).path
                match = JOBS_PATH.match(path)
                if match:
                    group, version, namespace, plural, name = match.groups()
                    if any(KINDS[k][:3] == (group, version, plural) for k in operator.served):
                        return f"{plural}/{namespace}", name
                found = DISCOVERY_PATH.match(path)
                if found and self.command == "GET":
                    for served in operator.served:
                        group, version, plural, kind = KINDS[served]
                        if found.groups() == (group, version):
                            resource = {"name": plural, "singularName": kind.lower(),
                                        "namespaced": True, "kind": kind,
                                        "verbs": ["create", "delete", "get", "list", "patch",
                                                  "update", "watch"]}  # fmt: skip
                            self._reply(200, {"kind": "APIResourceList", "apiVersion": "v1",
                                              "groupVersion": f"{group}/{version}",
                                              "resources": [resource]}, path)  # fmt: skip
                            return None
                self._status(404, "NotFound", path, "the server could not find the requested "
                             "resource")  # fmt: skip
                return None

            def do_POST(self) -> None:
                route = self._route()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if route is None:
                    return
                prefix, name = route
                key = f"{prefix}/{body['metadata']['name']}"
                operator.posted.append(body)
                operator.queries.append(parse_qs(urlsplit(self.path).query))
                with operator.lock:
                    exists = key in operator.jobs
                if operator.refuse:
                    return self._status(operator.refuse, "Invalid", key, operator.refusal)
                if name is not None or exists:
                    return self._status(409, "AlreadyExists", key)
                operator.created(key, json.loads(json.dumps(body)))
                self._reply(201, body, key)

            def do_GET(self) -> None:
                route = self._route()
                if route is None:
                    return
                key = "/".join(p for p in route if p)
                with operator.lock:
                    job = json.loads(json.dumps(operator.jobs.get(key)))
                if job is None:
                    return self._status(404, "NotFound", key)
                self._reply(200, job, key)

            def do_DELETE(self) -> None:
                route = self._route()
                if route is None:
                    return
                key = "/".join(p for p in route if p)
                with operator.lock:
                    job = operator.jobs.pop(key, None)
                if job is None:
                    return self._status(404, "NotFound", key)
                self._reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}, key)

            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

        return Handler

    def calls(self, method: str) -> list[str]:
        return [key for m, key, _ in self.requests if m == method]

    def job_calls(self, method: str) -> list[str]:
        """``calls`` without discovery requests."""
        return [key for key in self.calls(method) if not key.startswith("/apis/")]


def serve(served: tuple[str, ...] = ("pytorchjob",)):
    """(FakeOperator with ``host`` set, the server): call ``server.shutdown()`` and
    ``server.server_close()`` when done."""
    fake = FakeOperator(served)
    server = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    fake.host = f"http://127.0.0.1:{server.server_address[1]}"
    return fake, server


def api_for(host: str):
    """The real client, pointed at the loopback API."""
    from kubernetes import client

    return client.CustomObjectsApi(client.ApiClient(client.Configuration(host=host)))


def kubeconfig(path, host: str, namespace: str) -> str:
    """A kubeconfig file at ``path`` for the loopback API; returns its path."""
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": host}}],
        "users": [{"name": "me", "user": {"token": "t"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me",
                                                  "namespace": namespace}}]}))  # fmt: skip
    return str(path)
