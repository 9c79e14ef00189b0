# One customer-managed key for the buckets, the database, its master-password secret and Performance
# Insights: access to data then needs both an IAM grant and the key (and key use shows in CloudTrail).
resource "aws_kms_key" "data" {
  description             = "${var.name}: S3 buckets, MLflow database"
  enable_key_rotation     = true # yearly rotation; old material still decrypts old objects
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
}

resource "aws_kms_alias" "data" {
  name          = "alias/${var.name}-data"
  target_key_id = aws_kms_key.data.key_id
}

# The account administers the key; workloads get Decrypt/GenerateDataKey through their IAM roles
# (iam.tf), which this statement delegates to IAM. No principal outside the account.
data "aws_iam_policy_document" "kms" {
  #checkov:skip=CKV_AWS_111:A key policy's resource "*" is the key itself; the account root statement is AWS's required default that delegates to IAM
  #checkov:skip=CKV_AWS_356:A key policy's resource "*" is the key itself (it cannot name other resources)
  #checkov:skip=CKV_AWS_109:The account root statement delegates key permissions to IAM policies; without it the key becomes unmanageable
  statement {
    sid       = "AccountAdministersTheKeyThroughIAM"
    actions   = ["kms:*"]
    resources = ["*"] # in a key policy "*" means this key
    principals {
      type        = "AWS"
      identifiers = ["arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }
}
