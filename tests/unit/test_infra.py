"""infra/ (Terraform for AWS), checked without a cloud: parsed with python-hcl2 to pin the properties the
design promises, and scanned by checkov (no failed check without a written reason).

checkov (the ``checkov`` fixture of conftest.py) skips when its venv is absent.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 (dev extra) is not installed")

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
BUCKETS = {
    "shards": "shards",
    "checkpoints": "checkpoints",
    "mlflow_artifacts": "mlflow-artifacts",
    "attributions": "attributions",
}
WRITE_ACTIONS = {"s3:PutObject", "s3:DeleteObject", "s3:DeleteObjectVersion", "s3:RestoreObject"}


def _clean(value):
    """python-hcl2's tree without its quotes and bookkeeping keys."""
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items() if k not in ("__comments__", "__is_block__")}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _load(path: Path) -> dict:
    with open(path) as handle:
        return _clean(hcl2.load(handle))


def _blocks(tree: dict, kind: str) -> dict:
    """``resource``/``data`` blocks as {(type, name): body}; ``module``/``variable`` as {name: body}."""
    found = {}
    for entry in tree.get(kind, []):
        for first, body in entry.items():
            if kind in ("resource", "data"):
                for name, inner in body.items():
                    found[(first, name)] = inner
            else:
                found[first] = body
    return found


@pytest.fixture(scope="module")
def tf() -> dict:
    """Every block of infra/*.tf, merged by kind."""
    merged: dict = {}
    for path in sorted(INFRA.glob("*.tf")):
        tree = _load(path)
        for kind in ("resource", "data", "module", "variable", "locals", "output"):
            if kind == "locals":
                for entry in tree.get(kind, []):
                    merged.setdefault("locals", {}).update(entry)
            else:
                merged.setdefault(kind, {}).update(_blocks(tree, kind))
    return merged


@pytest.fixture(scope="module")
def bucket_module() -> dict:
    tree: dict = {}
    for path in sorted((INFRA / "modules" / "bucket").glob("*.tf")):
        for kind, value in _load(path).items():
            tree.setdefault(kind, []).extend(value)
    return {"resource": _blocks(tree, "resource"), "data": _blocks(tree, "data"), "variable": _blocks(tree, "variable")}


def test_four_buckets_each_from_the_hardened_module_with_one_writer(tf):
    modules = tf["module"]
    assert set(modules) == set(BUCKETS)
    writers = {}
    for key, suffix in BUCKETS.items():
        body = modules[key]
        assert body["source"] == "./modules/bucket"
        assert body["name"] == f"${{var.name}}-{suffix}"
        assert body["kms_key_arn"] == "${aws_kms_key.data.arn}"
        writers[key] = re.findall(r'aws_iam_role\.workload\["(\w+)"\]', body["writer_arns"])
    # nobody else writes: one workload per bucket (plus the explicit, empty-by-default break-glass list)
    assert writers == {
        "shards": ["ingest"],
        "checkpoints": ["train"],
        "mlflow_artifacts": ["mlflow"],
        "attributions": ["attribute"],
    }
    assert tf["variable"]["break_glass_writer_arns"]["default"] == []
    # old checkpoints and outputs expire; data sets and registered models do not
    assert {k for k, body in modules.items() if "expire_days" in body} == {"checkpoints", "attributions"}
    assert modules["checkpoints"]["expire_days"] == "${var.checkpoint_retention_days}"
    assert modules["attributions"]["expire_days"] == "${var.output_retention_days}"


def test_bucket_module_versioning_kms_public_block_lifecycle_and_policy(bucket_module):
    res = bucket_module["resource"]
    assert res[("aws_s3_bucket", "this")]["force_destroy"] is False
    versioning = res[("aws_s3_bucket_versioning", "this")]["versioning_configuration"][0]
    assert versioning["status"] == "Enabled"
    sse = res[("aws_s3_bucket_server_side_encryption_configuration", "this")]["rule"][0]
    default = sse["apply_server_side_encryption_by_default"][0]
    assert default == {"sse_algorithm": "aws:kms", "kms_master_key_id": "${var.kms_key_arn}"}
    block = res[("aws_s3_bucket_public_access_block", "this")]
    assert all(
        block[k] is True
        for k in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets")
    )
    assert res[("aws_s3_bucket_ownership_controls", "this")]["rule"][0]["object_ownership"] == "BucketOwnerEnforced"
    assert res[("aws_s3_bucket_logging", "this")]["target_bucket"] == "${var.log_bucket}"

    rule = res[("aws_s3_bucket_lifecycle_configuration", "this")]["rule"][0]
    assert rule["status"] == "Enabled"
    assert rule["noncurrent_version_expiration"][0]["noncurrent_days"] == "${var.noncurrent_version_days}"
    assert rule["abort_incomplete_multipart_upload"][0]["days_after_initiation"] <= 7
    dynamic = {name: body for entry in rule["dynamic"] for name, body in entry.items()}
    assert dynamic["expiration"]["content"][0]["days"] == "${expiration.value}"
    assert "var.expire_days" in dynamic["expiration"]["for_each"]

    statements = {s["sid"]: s for s in bucket_module["data"][("aws_iam_policy_document", "this")]["statement"]}
    tls = statements["DenyInsecureTransport"]
    assert tls["effect"] == "Deny" and tls["condition"][0]["values"] == ["false"]
    writes = statements["OnlyTheOwningWorkloadWrites"]
    assert writes["effect"] == "Deny" and set(writes["actions"]) == WRITE_ACTIONS
    assert writes["condition"][0]["test"] == "ArnNotEquals"
    assert writes["condition"][0]["values"] == "${var.writer_arns}"


def test_kms_key_rotates(tf):
    key = tf["resource"][("aws_kms_key", "data")]
    assert key["enable_key_rotation"] is True and key["deletion_window_in_days"] >= 7


def _grants(tf) -> dict[str, list[dict]]:
    return tf["locals"]["grants"]


def test_irsa_roles_are_per_workload_and_least_privilege(tf):
    workloads = tf["locals"]["workloads"]
    assert workloads == {
        "train": "wysiwyc-train",
        "attribute": "wysiwyc-attribute",
        "mlflow": "mlflow",
        "ingest": "wysiwyc-ingest",
        "mlflow-db-secret": "mlflow-db-secret",  # the External Secrets Operator (k8s/overlays/aws/mlflow-db.yaml)
    }
    trust = tf["data"][("aws_iam_policy_document", "irsa_trust")]["statement"][0]
    assert trust["actions"] == ["sts:AssumeRoleWithWebIdentity"]
    conditions = {c["variable"]: c["values"] for c in trust["condition"]}
    assert conditions["${var.oidc_provider_url}:sub"] == ["system:serviceaccount:${var.namespace}:${each.value}"]
    assert conditions["${var.oidc_provider_url}:aud"] == ["sts.amazonaws.com"]

    def buckets(resources):
        return {m for r in resources for m in re.findall(r'bucket_arn\["([\w-]+)"\]', r)}

    writes, reads = {}, {}
    for workload, statements in _grants(tf).items():
        for statement in statements:
            assert all("*" not in a for a in statement["actions"]), statement  # no s3:* or s3:Put*
            assert all(r.startswith("${local.bucket_arn[") for r in statement["resources"]), statement
            if WRITE_ACTIONS & set(statement["actions"]):
                writes.setdefault(workload, set()).update(buckets(statement["resources"]))
            if "s3:GetObject" in statement["actions"]:
                reads.setdefault(workload, set()).update(buckets(statement["resources"]))
    assert writes == {
        "train": {"checkpoints"},
        "attribute": {"attributions"},
        "mlflow": {"mlflow-artifacts"},
        "ingest": {"shards"},
    }
    assert reads["train"] == {"shards", "checkpoints"}
    assert reads["attribute"] == {"shards", "checkpoints", "attributions"}
    # attribution reads only the corpus part of the shards bucket
    attribute = _grants(tf)["attribute"]
    corpus = next(s for s in attribute if "s3:GetObject" in s["actions"])["resources"]
    assert [r for r in corpus if "shards" in r] == ['${local.bucket_arn["shards"]}/corpus/*']
    listing = [s for s in attribute if s["actions"] == ["s3:ListBucket"] and "shards" in s["resources"][0]]
    assert listing[0]["prefix"] == "corpus/*"
    # its final pass deletes the index parts it merged (attribute/outputs.dedup_chunk), and nothing else
    deletes = [r for s in attribute if "s3:DeleteObject" in s["actions"] for r in s["resources"]]
    assert deletes == ['${local.bucket_arn["attributions"]}/*/parts/*']
    # the secret syncer: nothing in S3, the database's RDS-managed secret and nothing else (read, not write)
    assert _grants(tf)["mlflow-db-secret"] == []
    secret = tf["data"][("aws_iam_policy_document", "mlflow_db_secret")]["statement"]
    assert secret == [{**secret[0], "actions": ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]}]
    assert secret[0]["resources"] == ["${aws_db_instance.mlflow.master_user_secret[0].secret_arn}"]
    policy = tf["resource"][("aws_iam_role_policy", "mlflow_db_secret")]
    assert policy["role"] == '${aws_iam_role.workload["mlflow-db-secret"].id}'
    # KMS: only the data key, only use (no administration)
    kms = tf["data"][("aws_iam_policy_document", "workload")]["statement"][0]
    assert kms["resources"] == ["${aws_kms_key.data.arn}"] and tf["locals"]["kms_use"] == [
        "kms:Decrypt",
        "kms:GenerateDataKey",
    ]


def test_mlflow_database_is_encrypted_private_and_keeps_no_password(tf):
    db = tf["resource"][("aws_db_instance", "mlflow")]
    assert db["engine"] == "postgres"
    assert db["storage_encrypted"] is True and db["kms_key_id"] == "${aws_kms_key.data.arn}"
    assert db["publicly_accessible"] is False
    assert db["manage_master_user_password"] is True and "password" not in db
    assert db["deletion_protection"] is True and db["backup_retention_period"] >= 7
    assert db["skip_final_snapshot"] is False
    params = {p["name"]: p["value"] for p in tf["resource"][("aws_db_parameter_group", "mlflow")]["parameter"]}
    assert params["rds.force_ssl"] == "1"
    # reachable only from the cluster's nodes, on 5432, no CIDR anywhere
    rules = [body for (kind, _), body in tf["resource"].items() if kind == "aws_vpc_security_group_ingress_rule"]
    assert rules == [
        {
            **rules[0],
            "from_port": 5432,
            "to_port": 5432,
            "referenced_security_group_id": "${var.cluster_security_group_id}",
        }
    ]
    assert not any("cidr" in k for r in rules for k in r)
    sg = tf["resource"][("aws_security_group", "mlflow_db")]
    assert "ingress" not in sg and "egress" not in sg


def test_irsa_role_names_match_the_aws_overlay():
    """k8s/overlays/aws annotates each ServiceAccount with the role infra/ creates for it."""
    variables = _blocks(_load(INFRA / "variables.tf"), "variable")
    name = variables["name"]["default"]
    overlay = REPO / "k8s" / "overlays" / "aws"
    text = (overlay / "irsa.yaml").read_text() + (overlay / "mlflow-db.yaml").read_text()
    annotated = dict(
        re.findall(
            r"name: ([\w-]+)\n  annotations:\n    eks.amazonaws.com/role-arn: "
            r"arn:aws:iam::\d{12}:role/([\w-]+)",
            text,
        )
    )
    workloads = _load(INFRA / "iam.tf")["locals"][0]["workloads"]
    assert annotated == {sa: f"{name}-{key}" for key, sa in workloads.items()}


def test_terraform_is_formatted():
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.skip("terraform is not installed")
    proc = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", "-diff", str(INFRA)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_checkov_finds_no_unexplained_failure(checkov):
    report, problems = checkov(INFRA, "terraform")
    assert not problems, "fix them, or skip with #checkov:skip=ID:reason:\n" + "\n".join(problems)
    assert report["summary"]["passed"] >= 200  # it really scanned the buckets, IAM and RDS
    assert report["summary"]["skipped"] <= 15
