variable "name" {
  description = "Bucket name"
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key for default encryption (SSE-KMS)"
  type        = string
}

variable "log_bucket" {
  description = "Bucket that receives the server access logs"
  type        = string
}

variable "writer_arns" {
  description = "The only IAM principals allowed to put or delete objects"
  type        = list(string)
}

variable "noncurrent_version_days" {
  description = "Days an overwritten or deleted version is kept"
  type        = number
}

variable "expire_days" {
  description = "Delete objects older than this (null: keep)"
  type        = number
  default     = null
}

variable "ia_days" {
  description = "Move objects to STANDARD_IA after this many days (with expire_days)"
  type        = number
  default     = 30
}
