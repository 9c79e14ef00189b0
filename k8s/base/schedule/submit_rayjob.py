"""Submitter of the scheduled attribution: one dated RayJob per CronJob tick, created from a template.

Runs in the CronJob's pod with its ServiceAccount, Python standard library only (the project image has
no kubectl)::

    python submit_rayjob.py --template attribute-template --prefix attribute

1. The run id is the UTC date of the tick's scheduled time, which the CronJob controller writes on the
   Job (annotation ``batch.kubernetes.io/cronjob-scheduled-timestamp``; the pod finds its Job through
   ``$JOB_NAME``). Without it (an old cluster, a Job created by hand) it is today's UTC date.
2. The suspended template RayJob is copied to ``PREFIX-RUNID`` with ``suspend`` off and ``__RUN_ID__``
   in its entrypoint replaced, owned by the Job (when the CronJob prunes old Jobs, their RayJobs go
   too). ``AlreadyExists`` means this tick was submitted before (a retried pod): it is followed, not
   created again.
3. It waits until the RayJob is ``Complete`` or ``Failed`` (so that the CronJob's
   ``concurrencyPolicy: Forbid`` also keeps two attribution runs apart) and exits 0 only when the Ray
   job ``SUCCEEDED``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request

PLACEHOLDER = "__RUN_ID__"
SCHEDULED = "batch.kubernetes.io/cronjob-scheduled-timestamp"
SA = "/var/run/secrets/kubernetes.io/serviceaccount"
FINISHED = ("Complete", "Failed")


def run_id_for(job: dict | None, now: dt.datetime) -> str:
    """``YYYY-MM-DD`` of the tick's scheduled time (UTC), else of ``now``."""
    stamp = ((job or {}).get("metadata", {}).get("annotations") or {}).get(SCHEDULED)
    when = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else now
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%d")


def make_rayjob(template: dict, run_id: str, prefix: str, owner: dict | None = None) -> dict:
    """The RayJob of one run: the template's spec, un-suspended, with the run id in name and entrypoint."""
    entrypoint = template["spec"]["entrypoint"]
    if entrypoint.count(PLACEHOLDER) != 1:
        raise ValueError(
            f"template {template['metadata']['name']}: the entrypoint must contain "
            f"{PLACEHOLDER} exactly once, got: {entrypoint}"
        )
    spec = copy.deepcopy(template["spec"])
    spec["suspend"] = False
    spec["entrypoint"] = entrypoint.replace(PLACEHOLDER, run_id)
    labels = {k: v for k, v in (template["metadata"].get("labels") or {}).items() if k != "wysiwyc.io/template"}
    metadata = {"name": f"{prefix}-{run_id}", "labels": {**labels, "wysiwyc.io/run-id": run_id}}
    if owner is not None:
        metadata["ownerReferences"] = [
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
            }
        ]
    return {"apiVersion": template["apiVersion"], "kind": "RayJob", "metadata": metadata, "spec": spec}


def outcome(rayjob: dict) -> str | None:
    """None while the RayJob runs; else its Ray job status (``SUCCEEDED``, ``FAILED``, ...)."""
    status = rayjob.get("status") or {}
    if status.get("jobDeploymentStatus") not in FINISHED:
        return None
    return status.get("jobStatus") or status.get("jobDeploymentStatus", "").upper()


class Api:
    """The Kubernetes API server, as this pod's ServiceAccount."""

    def __init__(self) -> None:
        with open(f"{SA}/token") as token, open(f"{SA}/namespace") as namespace:
            self.token, self.namespace = token.read().strip(), namespace.read().strip()
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        self.base = f"https://{host}:{port}"
        self.tls = ssl.create_default_context(cafile=f"{SA}/ca.crt")

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, context=self.tls, timeout=30) as answer:
            return json.load(answer)

    def rayjobs(self, name: str = "") -> str:
        return f"/apis/ray.io/v1/namespaces/{self.namespace}/rayjobs" + (f"/{name}" if name else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", required=True, help="name of the suspended template RayJob")
    parser.add_argument("--prefix", required=True, help="the RayJob of a run is PREFIX-RUNID")
    parser.add_argument("--poll", type=float, default=30.0, help="seconds between status checks")
    args = parser.parse_args(argv)

    api = Api()
    job = None
    if os.environ.get("JOB_NAME"):
        job = api.request("GET", f"/apis/batch/v1/namespaces/{api.namespace}/jobs/{os.environ['JOB_NAME']}")
    run_id = run_id_for(job, dt.datetime.now(dt.timezone.utc))
    rayjob = make_rayjob(api.request("GET", api.rayjobs(args.template)), run_id, args.prefix, job)
    name = rayjob["metadata"]["name"]
    try:
        api.request("POST", api.rayjobs(), rayjob)
        print(f"created RayJob {name}: {rayjob['spec']['entrypoint']}", flush=True)
    except urllib.error.HTTPError as exc:
        if exc.code != 409:
            raise
        print(f"RayJob {name} exists (this tick was submitted before): following it", flush=True)
    while (result := outcome(api.request("GET", api.rayjobs(name)))) is None:
        time.sleep(args.poll)
    print(f"RayJob {name}: {result}", flush=True)
    return 0 if result == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
