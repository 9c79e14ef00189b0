# The MLflow tracking + registry database: PostgreSQL, encrypted with the data key, in private subnets,
# reachable only from the EKS nodes, never public. The master password is generated and kept by RDS in
# Secrets Manager (no password in Terraform state or variables).
resource "aws_db_subnet_group" "mlflow" {
  name       = "${var.name}-mlflow"
  subnet_ids = var.private_subnet_ids
}

resource "aws_security_group" "mlflow_db" {
  name        = "${var.name}-mlflow-db"
  description = "MLflow database: postgres from the EKS nodes only"
  vpc_id      = var.vpc_id
  # no egress rule: Terraform removes AWS's default allow-all egress; the database initiates nothing
}

resource "aws_vpc_security_group_ingress_rule" "mlflow_db_from_nodes" {
  security_group_id            = aws_security_group.mlflow_db.id
  description                  = "postgres from the EKS nodes (the MLflow server pod)"
  referenced_security_group_id = var.cluster_security_group_id
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
}

resource "aws_db_parameter_group" "mlflow" {
  name   = "${var.name}-mlflow-pg16"
  family = "postgres16"
  parameter {
    name  = "rds.force_ssl" # clients must use TLS
    value = "1"
  }
  parameter {
    name  = "log_statement" # schema changes (MLflow migrations) in the logs
    value = "ddl"
  }
  parameter {
    name  = "log_min_duration_statement" # slow queries (ms) in the logs
    value = "1000"
  }
}

resource "aws_iam_role" "rds_monitoring" {
  name               = "${var.name}-rds-monitoring"
  assume_role_policy = data.aws_iam_policy_document.rds_monitoring_trust.json
}

data "aws_iam_policy_document" "rds_monitoring_trust" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["monitoring.rds.amazonaws.com"]
    }
  }
}

resource "aws_iam_role_policy_attachment" "rds_monitoring" {
  role       = aws_iam_role.rds_monitoring.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}

resource "aws_db_instance" "mlflow" {
  identifier     = "${var.name}-mlflow"
  engine         = "postgres"
  engine_version = "16"
  instance_class = var.db_instance_class
  db_name        = "mlflow"
  username       = "mlflow"

  manage_master_user_password   = true # RDS generates and rotates it in Secrets Manager
  master_user_secret_kms_key_id = aws_kms_key.data.arn

  allocated_storage     = 20
  max_allocated_storage = 200 # storage autoscaling: runs and metrics grow
  storage_type          = "gp3"
  storage_encrypted     = true
  kms_key_id            = aws_kms_key.data.arn

  db_subnet_group_name   = aws_db_subnet_group.mlflow.name
  vpc_security_group_ids = [aws_security_group.mlflow_db.id]
  publicly_accessible    = false
  multi_az               = var.db_multi_az
  parameter_group_name   = aws_db_parameter_group.mlflow.name

  iam_database_authentication_enabled = true
  auto_minor_version_upgrade          = true
  backup_retention_period             = 14
  copy_tags_to_snapshot               = true
  deletion_protection                 = true # the registry: model lineage and promotions
  skip_final_snapshot                 = false
  final_snapshot_identifier           = "${var.name}-mlflow-final"

  enabled_cloudwatch_logs_exports       = ["postgresql", "upgrade"]
  monitoring_interval                   = 60
  monitoring_role_arn                   = aws_iam_role.rds_monitoring.arn
  performance_insights_enabled          = true
  performance_insights_kms_key_id       = aws_kms_key.data.arn
  performance_insights_retention_period = 7
}

# The master password rotates (RDS-managed rotation, every 7 days). The External Secrets Operator copies it
# into the Secret `mlflow-db` every 5 minutes (k8s/overlays/aws/mlflow-db.yaml) and Reloader restarts MLflow
# when it changes; the role it assumes (iam.tf, ServiceAccount mlflow-db-secret) reads that secret alone.
data "aws_iam_policy_document" "mlflow_db_secret" {
  statement {
    sid       = "ReadTheDatabasePassword"
    actions   = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
    resources = [aws_db_instance.mlflow.master_user_secret[0].secret_arn]
  }
}

resource "aws_iam_role_policy" "mlflow_db_secret" {
  name   = "${var.name}-mlflow-db-secret-read"
  role   = aws_iam_role.workload["mlflow-db-secret"].id
  policy = data.aws_iam_policy_document.mlflow_db_secret.json
}
