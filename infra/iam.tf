# One IAM role per workload, assumable only by that workload's Kubernetes ServiceAccount (IRSA), each
# with the least it needs. Together with the bucket policies (s3.tf) nobody else writes:
#   train      (RayJobs train + sweep)  reads shards, reads/writes/deletes checkpoints (Ray prunes old ones)
#   attribute  (scheduled RayJob)       reads shards/corpus/* and checkpoints, writes attributions
#   mlflow     (tracking server)        reads/writes the MLflow artifact bucket
#   ingest     (`wysiwyc ingest` jobs)  reads/writes shards (--overwrite replaces a split)
#   mlflow-db-secret (External Secrets) reads the database's RDS-managed master password, nothing in S3
locals {
  workloads = {
    train     = "wysiwyc-train"
    attribute = "wysiwyc-attribute"
    mlflow    = "mlflow"
    ingest    = "wysiwyc-ingest"
    # the External Secrets Operator, for the Secret `mlflow-db`: reads the RDS-managed password (rds.tf)
    mlflow-db-secret = "mlflow-db-secret"
  }
  kms_use = ["kms:Decrypt", "kms:GenerateDataKey"] # SSE-KMS reads and writes
}

data "aws_iam_policy_document" "irsa_trust" {
  for_each = local.workloads
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }
    # exactly this ServiceAccount in this namespace, and tokens minted for STS
    condition {
      test     = "StringEquals"
      variable = "${var.oidc_provider_url}:sub"
      values   = ["system:serviceaccount:${var.namespace}:${each.value}"]
    }
    condition {
      test     = "StringEquals"
      variable = "${var.oidc_provider_url}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "workload" {
  for_each             = local.workloads
  name                 = "${var.name}-${each.key}"
  description          = "wysiwyc ${each.key}: IRSA role of ServiceAccount ${var.namespace}/${each.value}"
  assume_role_policy   = data.aws_iam_policy_document.irsa_trust[each.key].json
  max_session_duration = 43200 # 12 h: a training run outlives the 1 h default (the SDK refreshes anyway)
}

resource "aws_iam_role_policy" "workload" {
  for_each = local.workloads
  name     = "${var.name}-${each.key}-data"
  role     = aws_iam_role.workload[each.key].id
  policy   = data.aws_iam_policy_document.workload[each.key].json
}

locals {
  # statements per workload: {actions, resources, prefix (ListBucket restricted to it, or null)}
  grants = {
    train = [
      { actions = ["s3:ListBucket"], resources = [local.bucket_arn["shards"], local.bucket_arn["checkpoints"]], prefix = null },
      { actions = ["s3:GetObject"], resources = ["${local.bucket_arn["shards"]}/*"], prefix = null },
      { actions = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"], resources = ["${local.bucket_arn["checkpoints"]}/*"], prefix = null },
    ]
    attribute = [
      { actions = ["s3:ListBucket"], resources = [local.bucket_arn["shards"]], prefix = "corpus/*" },
      { actions = ["s3:ListBucket"], resources = [local.bucket_arn["attributions"]], prefix = null },
      { actions = ["s3:GetObject"], resources = ["${local.bucket_arn["shards"]}/corpus/*", "${local.bucket_arn["checkpoints"]}/*"], prefix = null },
      { actions = ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"], resources = ["${local.bucket_arn["attributions"]}/*"], prefix = null },
      # the final pass merges a run's index parts into one file and deletes them: only parts/ may be deleted
      { actions = ["s3:DeleteObject"], resources = ["${local.bucket_arn["attributions"]}/*/parts/*"], prefix = null },
    ]
    mlflow = [
      { actions = ["s3:ListBucket"], resources = [local.bucket_arn["mlflow-artifacts"]], prefix = null },
      { actions = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"], resources = ["${local.bucket_arn["mlflow-artifacts"]}/*"], prefix = null },
    ]
    ingest = [
      { actions = ["s3:ListBucket"], resources = [local.bucket_arn["shards"]], prefix = null },
      { actions = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"], resources = ["${local.bucket_arn["shards"]}/*"], prefix = null },
    ]
    mlflow-db-secret = [] # its one grant, the database's secret, is in rds.tf
  }
}

data "aws_iam_policy_document" "workload" {
  for_each = local.workloads

  dynamic "statement" {
    for_each = local.grants[each.key]
    content {
      actions   = statement.value.actions
      resources = statement.value.resources
      dynamic "condition" {
        for_each = statement.value.prefix == null ? [] : [statement.value.prefix]
        content {
          test     = "StringLike"
          variable = "s3:prefix"
          values   = [condition.value]
        }
      }
    }
  }

  statement {
    sid       = "UseTheDataKey"
    actions   = local.kms_use
    resources = [aws_kms_key.data.arn]
  }
}
