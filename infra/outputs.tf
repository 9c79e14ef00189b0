output "buckets" {
  description = "Bucket name per purpose (the s3:// URLs of k8s/overlays/aws)"
  value = {
    shards             = module.shards.bucket
    checkpoints        = module.checkpoints.bucket
    "mlflow-artifacts" = module.mlflow_artifacts.bucket
    attributions       = module.attributions.bucket
  }
}

output "workload_role_arns" {
  description = "IRSA role ARN per workload (the eks.amazonaws.com/role-arn annotations of k8s/overlays/aws)"
  value       = { for k, r in aws_iam_role.workload : k => r.arn }
}

output "mlflow_db_address" {
  description = "Host name of the MLflow database"
  value       = aws_db_instance.mlflow.address
}

output "mlflow_db_secret_arn" {
  description = "Secrets Manager secret holding the database's master password (managed by RDS)"
  value       = aws_db_instance.mlflow.master_user_secret[0].secret_arn
}

output "kms_key_arn" {
  description = "The key that encrypts buckets and database"
  value       = aws_kms_key.data.arn
}
