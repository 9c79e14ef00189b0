"""k8s/: each overlay renders with kustomize, validates against the Kubernetes schemas (core resources,
``kubernetes-validate``) and the KubeRay CRD schemas (``../shared/k8s-schemas``), and names only what
exists: the project image of the Dockerfile, ``wysiwyc`` subcommands and options, config files and keys.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import gzip
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
SCHEMAS = REPO.parent / "shared" / "k8s-schemas"
OVERLAYS = ("local", "aws")
K8S_VERSION = "1.32.0"  # kubectl/kustomize here are v1.32 / v5.5
APP_DIR = "/app/"  # the image's WORKDIR, where the Dockerfile copies configs/
PROJECT_IMAGE = {"local": "wysiwyc:0.1.0", "aws": "123456789012.dkr.ecr.us-east-1.amazonaws.com/wysiwyc:0.1.0"}
RAY_KINDS = {"RayJob", "RayCluster", "RayCronJob", "RayService"}
ESO_KINDS = {"ExternalSecret", "SecretStore"}  # the External Secrets Operator's (aws overlay)
VENDORED_SCHEMAS = Path(__file__).resolve().parent / "k8s-schemas"  # RayService and ESO CRDs (see its SOURCES.md)


def _render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed")
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, _render(request.param)


def _by(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _pod_specs(doc: dict) -> list[dict]:
    """The pod specs inside a workload resource."""
    spec = doc.get("spec", {})
    if doc["kind"] == "Deployment":
        return [spec["template"]["spec"]]
    if doc["kind"] == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if doc["kind"] in ("RayJob", "RayService"):  # the Ray nodes (head, workers), not the submitter
        return [t["spec"] for role, t in _ray_pod_templates(doc).items() if role != "submitter"]
    return []


# ----------------------------------------------------------------------------------- rendering


def test_overlays_render_the_workloads(rendered):
    _, docs = rendered
    assert set(_by(docs, "RayJob")) == {"train-explainer-voc-vgg16", "sweep-voc-vgg16-lambdas", "attribute-template"}
    assert set(_by(docs, "CronJob")) == {"attribute-daily"}
    assert set(_by(docs, "RayService")) == {"explainer-serve"}
    assert "mlflow" in _by(docs, "Deployment") and "mlflow" in _by(docs, "Service")
    assert {
        "wysiwyc-train",
        "wysiwyc-attribute",
        "wysiwyc-ingest",
        "wysiwyc-serve",
        "mlflow",
        "wysiwyc-scheduler",
    } <= set(_by(docs, "ServiceAccount"))
    assert all(d["metadata"].get("namespace") == "wysiwyc" for d in docs)


def test_core_resources_validate_against_kubernetes_schemas(rendered):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    _, docs = rendered
    core = [d for d in docs if d["kind"] not in RAY_KINDS | ESO_KINDS]
    assert len(core) >= 10
    for doc in core:
        # strict: an unknown field (a typo) is an error, as `kubectl apply --validate=strict` would say
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _strict(schema: dict) -> dict:
    """The CRD schema with unknown fields forbidden (the API server would silently prune them)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@functools.cache
def _crd_validator(kind: str):
    import jsonschema

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1 MB of YAML
    group = "external-secrets.io" if kind in ESO_KINDS else "ray.io"
    name = f"{group}_{kind.lower()}s.yaml"
    if kind == "RayService" or kind in ESO_KINDS:
        text = gzip.decompress((VENDORED_SCHEMAS / f"{name}.gz").read_bytes()).decode()
    else:
        text = (SCHEMAS / name).read_text()
    crd = yaml.load(text, Loader=loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def _validate_ray(doc: dict) -> None:
    if not SCHEMAS.is_dir() and doc["kind"] in RAY_KINDS - {"RayService"}:
        pytest.skip(f"KubeRay CRD schemas not available: {SCHEMAS} does not exist")
    body = {**doc, "metadata": {}}  # metadata is the API server's (the CRD schema leaves it open)
    errors = sorted(_crd_validator(doc["kind"]).iter_errors(body), key=str)
    assert not errors, f"{doc['kind']} {doc['metadata']['name']}: " + "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10]
    )


def test_ray_resources_validate_against_the_kuberay_crds(rendered):
    _, docs = rendered
    rayjobs = [d for d in docs if d["kind"] in RAY_KINDS]
    assert rayjobs and all(d["apiVersion"] == "ray.io/v1" for d in rayjobs)
    for doc in rayjobs:
        _validate_ray(doc)


def test_every_ray_cluster_takes_token_authentication(rendered):
    """KubeRay's authOptions (≥ 1.5.1): a token Secret per cluster, RAY_AUTH_MODE/RAY_AUTH_TOKEN in each Ray container,
    so that no pod that merely reaches a head's GCS, dashboard or client port can run code on it."""
    _, docs = rendered
    clusters = {}
    for doc in docs:
        if doc["kind"] not in RAY_KINDS:
            continue
        spec = doc["spec"]
        cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec")  # RayService / RayJob
        clusters[f"{doc['kind']}/{doc['metadata']['name']}"] = cluster
    assert len(clusters) == 4, sorted(clusters)
    for name, cluster in clusters.items():
        assert cluster.get("authOptions", {}).get("mode") == "token", name
        assert tuple(map(int, cluster["rayVersion"].split("."))) >= (2, 52), name  # Ray's token auth


def test_the_crd_check_catches_a_misspelt_field(rendered):
    _, docs = rendered
    broken = copy.deepcopy(_by(docs, "RayJob")["train-explainer-voc-vgg16"])
    broken["spec"]["shutdownAfterJobFinish"] = broken["spec"].pop("shutdownAfterJobFinishes")
    with pytest.raises(AssertionError, match="shutdownAfterJobFinish"):
        _validate_ray(broken)


# ----------------------------------------------------------------------------------- jobs


def test_the_rayservice_runs_the_serve_application_with_serve_keys(rendered):
    from pipeline.config import ServeConfig
    from pipeline.serve import app

    overlay, docs = rendered
    service = _by(docs, "RayService")["explainer-serve"]["spec"]
    (application,) = yaml.safe_load(service["serveConfigV2"])["applications"]
    assert application["import_path"] == "pipeline.serve:app" and application["route_prefix"] == "/"
    args = application["args"]
    config = ServeConfig(**args)  # every arg is a serve.* key with a valid value
    assert config.model.startswith("models:/") and config.model.endswith("@champion") and config.refresh_s > 0
    assert (config.gpus_per_replica > 0) == (overlay == "aws")
    workers = service["rayClusterConfig"]["workerGroupSpecs"][0]
    assert config.replicas <= workers["replicas"]  # a pod for every replica
    deployment = app(args)  # what Ray Serve calls with these args builds the application
    assert type(deployment).__name__ == "Application"
    with pytest.raises(Exception, match="unknown argument"):
        app({**args, "replica": 2})
    broken = copy.deepcopy(_by(docs, "RayService")["explainer-serve"])  # the vendored CRD schema bites too
    broken["spec"]["serveConfig"] = broken["spec"].pop("serveConfigV2")
    with pytest.raises(AssertionError, match="serveConfig"):
        _validate_ray(broken)


def test_rayjobs_resume_on_retry_and_clean_up(rendered):
    _, docs = rendered
    for name, job in _by(docs, "RayJob").items():
        spec = job["spec"]
        assert spec["backoffLimit"] >= 1, name
        assert spec["shutdownAfterJobFinishes"] is True and 0 < spec["ttlSecondsAfterFinished"] <= 3600, name
        assert spec["activeDeadlineSeconds"] > 0, name
        assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] in ("0", "1"), name
    # deterministic names, so that a retry finds the checkpoints of the attempt before
    train = _by(docs, "RayJob")["train-explainer-voc-vgg16"]["spec"]["entrypoint"]
    assert "trainer.run_name=paper-explainer-voc-vgg16" in train or "trainer.run_name=cpu-explainer" in train
    assert _by(docs, "RayJob")["attribute-template"]["spec"]["suspend"] is True


def test_gpu_workers_on_aws_cpu_workers_locally(rendered):
    overlay, docs = rendered
    clusters = {n: j["spec"]["rayClusterSpec"] for n, j in _by(docs, "RayJob").items()}
    clusters |= {n: s["spec"]["rayClusterConfig"] for n, s in _by(docs, "RayService").items()}
    for name, cluster in clusters.items():
        for group in cluster["workerGroupSpecs"]:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] >= 1, name
            if overlay == "aws":
                assert limits["nvidia.com/gpu"] == "1", name
            else:
                assert "nvidia.com/gpu" not in limits, name


def test_every_container_has_resources_and_the_project_image_runs_as_non_root(rendered):
    overlay, docs = rendered
    containers = 0
    for doc in docs:
        for pod in _pod_specs(doc):
            for container in pod["containers"]:
                containers += 1
                resources = container["resources"]
                assert resources["requests"]["memory"] and resources["limits"]["memory"], doc["metadata"]["name"]
                image = container["image"]
                if image.split(":")[0].endswith("wysiwyc"):
                    assert image == PROJECT_IMAGE[overlay]
                    assert pod["securityContext"]["runAsNonRoot"] is True
                    assert pod["securityContext"]["runAsUser"] == 10001
                else:  # a third-party image: pinned, never :latest
                    assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), image
    assert containers >= 10  # 3 RayJobs and the RayService × (head + worker), MLflow, the submitter (+ SeaweedFS)


def test_ray_pods_run_confined_and_the_endpoint_holds_no_storage_keys(rendered):
    """Every Ray head and worker: the runtime's seccomp profile, no privilege escalation, no capabilities;
    the serving pods read models through MLflow's artifact proxy, so they are given no S3 keys."""
    _, docs = rendered
    ray_containers = 0
    for doc in docs:
        if doc["kind"] not in RAY_KINDS:
            continue
        for pod in _pod_specs(doc):
            for container in pod["containers"]:
                if container["name"] not in ("ray-head", "ray-worker"):
                    continue
                ray_containers += 1
                where = f"{doc['metadata']['name']}/{container['name']}"
                assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
                confined = container.get("securityContext", {})
                assert confined.get("allowPrivilegeEscalation") is False, where
                assert confined.get("capabilities", {}).get("drop") == ["ALL"], where
                if doc["kind"] == "RayService":
                    refs = [e.get("secretRef", {}).get("name") for e in container.get("envFrom", [])]
                    assert "wysiwyc-s3" not in refs, where
    assert ray_containers == 8  # 3 RayJobs / RayCronJobs and the RayService × (head + worker)


def _ray_pod_templates(doc: dict) -> dict[str, dict]:
    """The pod templates KubeRay makes pods from: head, each worker group and (RayJob) the submitter."""
    spec = doc["spec"]
    cluster = spec["rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"]
    found = {"head": cluster["headGroupSpec"]["template"]}
    found |= {f"worker:{g['groupName']}": g["template"] for g in cluster.get("workerGroupSpecs", [])}
    if doc["kind"] == "RayJob":
        found["submitter"] = spec.get("submitterPodTemplate", {})  # KubeRay's default carries no label of ours
    return found


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()) and not selector.get(
        "matchExpressions"
    )


def _admitted(policies: list[dict], source: dict, target: dict, port: int) -> bool:
    """Whether Kubernetes' NetworkPolicy semantics let a TCP connection from pod ``source`` reach ``target`` on
    ``port`` (each ``{"labels", "namespace"}``; namespaces carry only their name label): a pod no Ingress
    policy selects takes everything, a selected one only what one of its policies' rules allows."""
    selecting = [
        p
        for p in policies
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and p["metadata"]["namespace"] == target["namespace"]
        and _matches(p["spec"]["podSelector"], target["labels"])
    ]
    if not selecting:
        return True
    namespace_labels = {"kubernetes.io/metadata.name": source["namespace"]}
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports):
                continue
            for peer in rule.get("from", [{}]):  # no `from`: every source
                if "namespaceSelector" in peer:
                    in_namespace = _matches(peer["namespaceSelector"], namespace_labels)
                else:
                    in_namespace = source["namespace"] == policy["metadata"]["namespace"]
                if in_namespace and _matches(peer.get("podSelector", {}), source["labels"]):
                    return True
    return False


RAY_PORTS = (6379, 8265, 10001, 20000)  # GCS, dashboard / job API, client, a worker port Ray picked


def test_ray_ports_admit_only_the_clusters_own_pods_its_submitter_and_the_operator(rendered):
    """Whoever reaches a Ray head's GCS, dashboard or client port can run code there: every head, worker and
    submitter pod template carries its cluster's label, and the NetworkPolicies (evaluated with Kubernetes'
    rules) let in only the pods of that cluster, the KubeRay operator on the dashboard (and the Serve proxy it
    health-checks) and, for the endpoint, its clients on Serve's port. Before the policies every pod got in."""
    _, docs = rendered
    policies = list(_by(docs, "NetworkPolicy").values())
    pods = {}  # "workload/template" -> pod
    for doc in docs:
        if doc["kind"] in RAY_KINDS:
            for role, template in _ray_pod_templates(doc).items():
                labels = template.get("metadata", {}).get("labels", {})
                pods[f"{doc['metadata']['name']}/{role}"] = {"labels": labels, "namespace": "wysiwyc"}
    clusters = {pod["labels"].get("wysiwyc.io/ray-cluster") for pod in pods.values()}
    assert clusters == {"train-explainer", "sweep", "attribute", "serve"}, pods  # every template labelled
    operator = {"labels": {"app.kubernetes.io/name": "kuberay-operator"}, "namespace": "kuberay-system"}
    others = {
        "mlflow": {"labels": _by(docs, "Deployment")["mlflow"]["spec"]["template"]["metadata"]["labels"]},
        "any pod": {"labels": {}},
        "scheduler": {"labels": {"batch.kubernetes.io/job-name": "attribute-daily-1"}},
    }
    others = {name: {**pod, "namespace": "wysiwyc"} for name, pod in others.items()}
    others["another namespace"] = {"labels": {"wysiwyc.io/ray-cluster": "serve"}, "namespace": "default"}
    for name, pod in pods.items():
        cluster = pod["labels"]["wysiwyc.io/ray-cluster"]
        own = [p for n, p in pods.items() if p["labels"]["wysiwyc.io/ray-cluster"] == cluster and n != name]
        strangers = [p for p in pods.values() if p["labels"]["wysiwyc.io/ray-cluster"] != cluster]
        for port in RAY_PORTS:
            assert all(_admitted(policies, p, pod, port) for p in own), (name, port)
            for source in [*strangers, *others.values()]:
                assert not _admitted(policies, source, pod, port), (name, port, source)
            assert _admitted(policies, operator, pod, port) == (port == 8265), (name, port)
        # Serve's HTTP port: the endpoint's clients in the namespace, and the operator's health check
        serve = cluster == "serve"
        assert _admitted(policies, others["any pod"], pod, 8000) == serve, name
        assert _admitted(policies, operator, pod, 8000) == serve, name
    # the check itself: with no policy every pod gets in (the manifests before this one)
    any_head = pods["train-explainer-voc-vgg16/head"]
    assert _admitted([p for p in policies if not p["metadata"]["name"].startswith("ray-")], operator, any_head, 6379)


def test_mlflow_runs_its_auth_app_and_every_ray_pod_authenticates_as_its_own_identity(rendered):
    """MLflow's basic-auth app (default permission NO_PERMISSIONS, admin password from a Secret nobody writes in a
    file); the pipeline's identities made by the `mlflow-users` Job from the same Secret; train and sweep as
    `promoter`, the endpoint and attribution as read-only identities of their own."""
    overlay, docs = rendered
    mlflow = _by(docs, "Deployment")["mlflow"]["spec"]["template"]["spec"]
    container = mlflow["containers"][0]
    assert "--app-name=basic-auth" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "mlflow-auth",
        "key": "admin-password",
    }
    assert "value" not in env["MLFLOW_AUTH_ADMIN_PASSWORD"] and "mlflow-auth" not in _by(docs, "Secret")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    config_dir, _, config_file = env["MLFLOW_AUTH_CONFIG_PATH"]["value"].rpartition("/")
    volume = {v["name"]: v for v in mlflow["volumes"]}[mounts[config_dir]]["secret"]
    assert volume["secretName"].startswith("mlflow-db")  # the local overlay's generated name has a hash suffix
    assert volume["items"] == [{"key": config_file, "path": config_file}]
    if overlay == "local":  # on aws the ExternalSecret writes the same key (test_the_database_password_...)
        ini = _by(docs, "Secret")
        (secret,) = [d for name, d in ini.items() if name.startswith("mlflow-db")]
        text = _secret_text(secret, config_file)
        assert "default_permission = NO_PERMISSIONS" in text and "admin_password" not in text
    identities = {}
    for doc in docs:
        if doc["kind"] not in RAY_KINDS:
            continue
        for pod in _pod_specs(doc):
            for ray in pod["containers"]:
                variables = {e["name"]: e for e in ray.get("env", [])}
                user = variables["MLFLOW_TRACKING_USERNAME"]["value"]
                assert variables["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
                    "name": "mlflow-auth",
                    "key": f"{user}-password",
                }
                identities.setdefault(doc["metadata"]["name"], set()).add(user)
    assert identities == {
        "train-explainer-voc-vgg16": {"promoter"},
        "sweep-voc-vgg16-lambdas": {"promoter"},
        "attribute-template": {"attribute"},
        "explainer-serve": {"serve"},
    }
    job = _by(docs, "Job")["mlflow-users"]["spec"]["template"]["spec"]
    made = job["containers"][0]
    keys = {e["valueFrom"]["secretKeyRef"]["key"] for e in made["env"]}
    assert keys == {"admin-password"} | {f"{user}-password" for users in identities.values() for user in users}
    assert "make_mlflow_users" in made["args"][0] and job["automountServiceAccountToken"] is False


def _secret_text(secret: dict, key: str) -> str:
    import base64

    if key in secret.get("stringData", {}):
        return secret["stringData"][key]
    return base64.b64decode(secret["data"][key]).decode()


def test_the_database_password_follows_its_rotation():
    """RDS rotates the master password (managed, 7 days): the External Secrets Operator syncs it into the Secret
    `mlflow-db` every few minutes (both keys MLflow reads, from the RDS secret's JSON), with an IRSA role that may
    read that secret alone, and Reloader restarts MLflow when it changes. Checked against the operator's v1 CRDs
    (static: no cluster here)."""
    docs = _render("aws")
    for doc in docs:
        if doc["kind"] in ESO_KINDS:
            _validate_ray(doc)  # the same strict CRD check, with the vendored ESO schemas
    external = _by(docs, "ExternalSecret")["mlflow-db"]["spec"]
    assert external["target"]["name"] == "mlflow-db"
    assert set(external["target"]["template"]["data"]) == {"uri", "basic_auth.ini"}
    minutes = {"m": 1, "h": 60}[external["refreshInterval"][-1]] * int(external["refreshInterval"][:-1])
    assert minutes <= 15
    refs = {d["secretKey"]: d["remoteRef"] for d in external["data"]}
    assert {k: r["property"] for k, r in refs.items()} == {"username": "username", "password": "password"}
    assert all(r["key"].startswith("arn:aws:secretsmanager:") and ":secret:rds!" in r["key"] for r in refs.values())
    for value in external["target"]["template"]["data"].values():
        assert "{{ .password | urlquery }}" in value and "sslmode=require" in value
    store = _by(docs, "SecretStore")[external["secretStoreRef"]["name"]]["spec"]["provider"]["aws"]
    account = store["auth"]["jwt"]["serviceAccountRef"]["name"]
    role = _by(docs, "ServiceAccount")[account]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert role.endswith("-mlflow-db-secret") and store["service"] == "SecretsManager"
    mlflow = _by(docs, "Deployment")["mlflow"]
    assert mlflow["metadata"]["annotations"]["secret.reloader.stakater.com/reload"] == "mlflow-db"
    assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith("mlflow-db")]
    assert "create secret generic mlflow-db" not in (K8S / "overlays" / "aws" / "kustomization.yaml").read_text()


def test_aws_uses_irsa_and_no_stored_credentials():
    docs = _render("aws")
    assert not _by(docs, "Secret")
    for name in ("wysiwyc-train", "wysiwyc-attribute", "wysiwyc-ingest", "mlflow"):
        annotation = _by(docs, "ServiceAccount")[name]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        assert annotation.startswith("arn:aws:iam::")
    for name, job in _by(docs, "RayJob").items():
        assert "s3://wysiwyc/" not in job["spec"]["entrypoint"], f"{name}: still the base bucket"


def test_attribution_schedule_forbids_overlap_and_has_only_its_permissions(rendered):
    _, docs = rendered
    cron = _by(docs, "CronJob")["attribute-daily"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and cron["timeZone"] == "Etc/UTC"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "wysiwyc-scheduler"
    container = pod["containers"][0]
    assert container["command"] == ["python", "/opt/submitter/submit_rayjob.py"]
    args = dict(zip(container["args"][::2], container["args"][1::2]))
    assert _by(docs, "RayJob")[args["--template"]]["spec"]["suspend"] is True
    mounted = {v["name"]: v for v in pod["volumes"]}[container["volumeMounts"][0]["name"]]
    configmap = _by(docs, "ConfigMap")[mounted["configMap"]["name"]]
    assert configmap["data"]["submit_rayjob.py"] == (K8S / "base" / "schedule" / "submit_rayjob.py").read_text()
    rules = _by(docs, "Role")["wysiwyc-scheduler"]["rules"]
    assert {(r["apiGroups"][0], r["resources"][0]): set(r["verbs"]) for r in rules} == {
        ("ray.io", "rayjobs"): {"get", "create"},
        ("batch", "jobs"): {"get"},
    }


def _submitter():
    spec = importlib.util.spec_from_file_location("submit_rayjob", K8S / "base" / "schedule" / "submit_rayjob.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_submitter_makes_the_dated_rayjob_of_the_scheduled_tick(rendered):
    _, docs = rendered
    submit = _submitter()
    job = {
        "metadata": {
            "name": "attribute-daily-29400000",
            "uid": "u-1",
            "annotations": {"batch.kubernetes.io/cronjob-scheduled-timestamp": "2026-11-29T02:00:00Z"},
        }
    }
    late = dt.datetime(2026, 11, 30, 1, 0, tzinfo=dt.timezone.utc)  # a retry the next day: same tick, same id
    run_id = submit.run_id_for(job, late)
    assert run_id == "2026-11-29"
    assert submit.run_id_for(None, late) == "2026-11-30"
    template = _by(docs, "RayJob")["attribute-template"]
    made = submit.make_rayjob(template, run_id, "attribute", job)
    assert made["metadata"]["name"] == "attribute-2026-11-29"
    assert made["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert made["spec"]["suspend"] is False and "--run-id 2026-11-29 " in made["spec"]["entrypoint"]
    assert "__RUN_ID__" not in made["spec"]["entrypoint"]
    assert made["spec"]["rayClusterSpec"] == template["spec"]["rayClusterSpec"]
    _validate_ray({**made, "metadata": {"name": made["metadata"]["name"]}})
    assert submit.outcome({"status": {"jobDeploymentStatus": "Running"}}) is None
    assert submit.outcome({"status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}}) == "SUCCEEDED"
    assert submit.outcome({"status": {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED"}}) == "FAILED"
    with pytest.raises(ValueError, match="__RUN_ID__"):
        submit.make_rayjob(
            {**template, "spec": {**template["spec"], "entrypoint": "wysiwyc attribute"}}, run_id, "attribute"
        )


# ----------------------------------------------------------------------------------- names that must exist


def _help(*command: str) -> str:
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, f"`wysiwyc {' '.join(command)}` does not exist:\n{result.output}"
    return result.output


def _commands(docs: list[dict]) -> list[tuple[str, list[str]]]:
    """Every ``wysiwyc`` command line in the manifests: the RayJob entrypoints."""
    found = []
    for name, job in _by(docs, "RayJob").items():
        found.append((name, shlex.split(job["spec"]["entrypoint"].replace("__RUN_ID__", "2026-11-29"))))
    return found


def test_commands_config_files_and_keys_exist(rendered):
    from pipeline.config import load_config
    from pipeline.tune import load_sweep

    _, docs = rendered
    for name, argv in _commands(docs):
        assert argv[0] == "wysiwyc", name
        subcommand = argv[1:3] if argv[1] == "train" else argv[1:2]
        text = _help(*subcommand)
        rest = argv[1 + len(subcommand) :]
        config, overrides, i = None, [], 0
        while i < len(rest):
            token = rest[i]
            if token.startswith("-"):
                assert re.search(rf"(?<![\w-]){re.escape(token)}(?![\w-])", text), (
                    f"{name}: `wysiwyc {' '.join(subcommand)}` has no option {token}"
                )
                if token in ("-c", "--config"):
                    config = rest[i + 1]
                if token != "--json":
                    i += 1
            else:
                overrides.append(token)
            i += 1
        assert config and config.startswith(APP_DIR + "configs/"), f"{name}: -c {config}"
        path = REPO / config[len(APP_DIR) :]
        assert path.is_file(), f"{name}: {config} → {path.relative_to(REPO)} does not exist in the project"
        # every key of the overrides exists in the config model (unknown keys are errors)
        if subcommand == ["sweep"]:
            load_sweep(path, overrides)
        else:
            load_config(path, overrides)


def _dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[_canonical(name)] = version
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pip_installs(instructions: list[tuple[str, str]]) -> list[list[str]]:
    """The arguments after ``pip install`` of every RUN that has one (``python -m pip`` alike)."""
    found = []
    for op, args in instructions:
        if op != "RUN":
            continue
        for command in re.split(r"&&|;", args):
            words = shlex.split(command)
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    found.append(words[i + 2 :])
    return found


def test_the_image_holds_the_package_and_configs_at_app():
    instructions = _dockerfile()
    assert ("WORKDIR", "/app") in instructions
    assert ("COPY", "configs ./configs") in instructions and ("COPY", "pipeline ./pipeline") in instructions
    user = [args for op, args in instructions if op == "USER"]
    assert user == ["10001"], user  # the manifests' runAsUser, not root
    last_run = max(i for i, (op, _) in enumerate(instructions) if op == "RUN")
    assert instructions.index(("USER", "10001")) > last_run
    assert ("ENTRYPOINT", '["wysiwyc"]') in instructions
    assert "[project.scripts]\nwysiwyc = " in (REPO / "pyproject.toml").read_text()
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "tests"} <= set(ignored)
    assert not {"configs", "pipeline", "requirements.lock"} & set(ignored)


def _image_problems(instructions: list[tuple[str, str]], lock: dict[str, str]) -> list[str]:
    """What keeps an image from being the lock's: a base other than a pinned python:X.Y.Z-slim of the lock's
    Python (a framework image brings its own torch), a pip install not constrained by requirements.lock or
    before it is copied in, a version pinned in the Dockerfile that differs from the lock's."""
    problems = []
    bases = [args for op, args in instructions if op == "FROM"]
    match = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-\w+", bases[0]) if len(bases) == 1 else None
    if match is None:
        problems.append(f"base {bases}: not one pinned python:X.Y.Z-slim image")
    elif tuple(map(int, match.groups()[:2])) != sys.version_info[:2]:
        problems.append(f"base {bases[0]}: not the lock's Python {sys.version_info[:2]}")
    installs = _pip_installs(instructions)
    if not installs:
        problems.append("no pip install")
    copied = [i for i, (op, args) in enumerate(instructions) if op == "COPY" and "requirements.lock" in args.split()]
    runs = [i for i, (op, args) in enumerate(instructions) if op == "RUN" and "install" in args]
    if not copied or (runs and copied[0] > runs[0]):
        problems.append("requirements.lock is not copied in before the install")
    for args in installs:
        constraints = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-c", "--constraint")]
        if constraints != ["requirements.lock"]:
            problems.append(f"pip install {' '.join(args)}: not constrained by requirements.lock")
        for requirement in (a for a in args if "==" in a):
            name, version = requirement.split("==")
            if lock.get(_canonical(name), version) != version:
                problems.append(f"{requirement}: the lock has {lock[_canonical(name)]}")
    return problems


def test_the_image_installs_exactly_the_locked_versions_on_the_python_of_the_lock():
    """Checked statically (no docker here): the Dockerfile's base and install lines against the lock."""
    lock = _lock()
    assert lock["torch"] == "2.14.1" and lock["torchvision"] == "0.29.1"  # what the suite ran with
    assert _image_problems(_dockerfile(), lock) == []


def test_the_image_check_fails_the_dockerfile_it_replaced(tmp_path, monkeypatch):
    old = (
        "FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime\nWORKDIR /app\nCOPY pyproject.toml README.md ./\n"
        'RUN pip install . "torch==2.5.1" \\\n  && pip check\n'
    )
    (tmp_path / "Dockerfile").write_text(old)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert _image_problems(_dockerfile(), {"torch": "2.14.1"}) == [
        "base ['pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime']: not one pinned python:X.Y.Z-slim image",
        "requirements.lock is not copied in before the install",
        "pip install . torch==2.5.1: not constrained by requirements.lock",
        "torch==2.5.1: the lock has 2.14.1",
    ]


def test_checkov_finds_no_unexplained_failure_in_the_rendered_overlays(checkov, tmp_path):
    for overlay in OVERLAYS:
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(_render(overlay)))
    report, problems = checkov(tmp_path, "kubernetes")
    assert not problems, "fix them, or skip with a checkov.io/skipN annotation:\n" + "\n".join(problems)
    assert report["summary"]["passed"] >= 400
