variable "name" {
  description = "Prefix of every resource name; buckets are NAME-shards, NAME-checkpoints, NAME-mlflow-artifacts, NAME-attributions (k8s/overlays/aws uses wysiwyc-prod)"
  type        = string
  default     = "wysiwyc-prod"
}

variable "region" {
  description = "AWS region"
  type        = string
  default     = "us-east-1"
}

variable "namespace" {
  description = "Kubernetes namespace of the workloads (the IRSA trust policies name it)"
  type        = string
  default     = "wysiwyc"
}

variable "oidc_provider_arn" {
  description = "ARN of the EKS cluster's IAM OIDC provider (IRSA)"
  type        = string
}

variable "oidc_provider_url" {
  description = "Issuer URL of the EKS cluster's OIDC provider, without https:// (e.g. oidc.eks.us-east-1.amazonaws.com/id/ABC)"
  type        = string
}

variable "vpc_id" {
  description = "VPC of the EKS cluster (the database lives there)"
  type        = string
}

variable "private_subnet_ids" {
  description = "Private subnets (two or more AZs) for the database"
  type        = list(string)
}

variable "cluster_security_group_id" {
  description = "Security group of the EKS nodes: the only source allowed to reach the database"
  type        = string
}

variable "checkpoint_retention_days" {
  description = "Checkpoints and sweep trials older than this are deleted (registered models keep their weights in the MLflow bucket)"
  type        = number
  default     = 180
}

variable "output_retention_days" {
  description = "Attribution outputs older than this are deleted"
  type        = number
  default     = 365
}

variable "noncurrent_version_days" {
  description = "Overwritten or deleted object versions are kept this long (undo window), then removed"
  type        = number
  default     = 30
}

variable "db_instance_class" {
  description = "Instance class of the MLflow database"
  type        = string
  default     = "db.t4g.medium"
}

variable "db_multi_az" {
  description = "Standby replica in a second AZ for the MLflow database"
  type        = bool
  default     = true
}

variable "break_glass_writer_arns" {
  description = "IAM principals that may write objects besides the workload roles (e.g. an incident role); empty: nobody else"
  type        = list(string)
  default     = []
}
