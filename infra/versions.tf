# AWS resources of wysiwyc: object storage (4 buckets + their access-log bucket), one KMS key, IAM roles
# per workload for IRSA, and the MLflow database. The EKS cluster, its VPC and KubeRay are not made
# here: pass the cluster's OIDC provider, VPC, private subnets and node security group as variables.
#   terraform -chdir=infra init && terraform -chdir=infra apply -var-file=prod.tfvars
terraform {
  required_version = ">= 1.6"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.80"
    }
  }
}

provider "aws" {
  region = var.region
  default_tags {
    tags = {
      project    = "wysiwyc"
      managed-by = "terraform"
    }
  }
}

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
