# The four buckets of the pipeline (modules/bucket: versioning, SSE-KMS, public access blocked, ACLs
# off, TLS only, access logs, lifecycle rules) and a policy that denies object writes to everyone but
# the workload that owns the data ("nobody else writes"; var.break_glass_writer_arns for incidents):
#   shards            written by ingest; read by training (all) and attribution (corpus/ only)
#   checkpoints       written by training and sweeps; read by attribution (the Explanandum checkpoint)
#   mlflow-artifacts  written and read by the MLflow server only (clients go through its proxy)
#   attributions      written and read (resume) by attribution
module "shards" {
  source                  = "./modules/bucket"
  name                    = "${var.name}-shards"
  kms_key_arn             = aws_kms_key.data.arn
  log_bucket              = aws_s3_bucket.logs.id
  writer_arns             = concat([aws_iam_role.workload["ingest"].arn], var.break_glass_writer_arns)
  noncurrent_version_days = var.noncurrent_version_days
  # no expiry: data sets are kept, only their old versions go
}

module "checkpoints" {
  source                  = "./modules/bucket"
  name                    = "${var.name}-checkpoints"
  kms_key_arn             = aws_kms_key.data.arn
  log_bucket              = aws_s3_bucket.logs.id
  writer_arns             = concat([aws_iam_role.workload["train"].arn], var.break_glass_writer_arns)
  noncurrent_version_days = var.noncurrent_version_days
  expire_days             = var.checkpoint_retention_days # registered weights live in mlflow-artifacts
  ia_days                 = 30
}

module "mlflow_artifacts" {
  source                  = "./modules/bucket"
  name                    = "${var.name}-mlflow-artifacts"
  kms_key_arn             = aws_kms_key.data.arn
  log_bucket              = aws_s3_bucket.logs.id
  writer_arns             = concat([aws_iam_role.workload["mlflow"].arn], var.break_glass_writer_arns)
  noncurrent_version_days = var.noncurrent_version_days
  # no expiry: registered models and their lineage live here
}

module "attributions" {
  source                  = "./modules/bucket"
  name                    = "${var.name}-attributions"
  kms_key_arn             = aws_kms_key.data.arn
  log_bucket              = aws_s3_bucket.logs.id
  writer_arns             = concat([aws_iam_role.workload["attribute"].arn], var.break_glass_writer_arns)
  noncurrent_version_days = var.noncurrent_version_days
  expire_days             = var.output_retention_days
  ia_days                 = 30
}

locals {
  bucket_arn = {
    shards             = module.shards.arn
    checkpoints        = module.checkpoints.arn
    "mlflow-artifacts" = module.mlflow_artifacts.arn
    attributions       = module.attributions.arn
  }
}

# Server access logs of the four buckets. S3 log delivery supports only SSE-S3 on its target, and a
# log bucket logging into itself would loop: both checks are skipped for this bucket alone.
resource "aws_s3_bucket" "logs" {
  #checkov:skip=CKV_AWS_18:This is the access-log bucket; logging it into itself would loop
  #checkov:skip=CKV_AWS_145:S3 server access log delivery only supports SSE-S3 (AES256) on the target bucket
  #checkov:skip=CKV_AWS_144:Access logs are not replicated; they are kept for the audit window only
  #checkov:skip=CKV2_AWS_62:No consumer of event notifications for access logs
  bucket        = "${var.name}-access-logs"
  force_destroy = false
}

resource "aws_s3_bucket_versioning" "logs" {
  bucket = aws_s3_bucket.logs.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "logs" {
  bucket = aws_s3_bucket.logs.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256" # the only encryption S3 log delivery writes into
    }
  }
}

resource "aws_s3_bucket_public_access_block" "logs" {
  bucket                  = aws_s3_bucket.logs.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "logs" {
  bucket = aws_s3_bucket.logs.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "logs" {
  bucket = aws_s3_bucket.logs.id
  rule {
    id     = "expire-access-logs"
    status = "Enabled"
    filter {}
    expiration {
      days = 365
    }
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
}

resource "aws_s3_bucket_policy" "logs" {
  bucket     = aws_s3_bucket.logs.id
  policy     = data.aws_iam_policy_document.logs.json
  depends_on = [aws_s3_bucket_public_access_block.logs]
}

# only S3's log delivery, for the four buckets of this account, writes here
data "aws_iam_policy_document" "logs" {
  statement {
    sid       = "S3ServerAccessLogDelivery"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.logs.arn}/*"]
    principals {
      type        = "Service"
      identifiers = ["logging.s3.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = values(local.bucket_arn)
    }
  }
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.logs.arn, "${aws_s3_bucket.logs.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}
