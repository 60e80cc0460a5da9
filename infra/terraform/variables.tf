variable "region" {
  description = "AWS region of the bucket and the Ray cluster (cluster.yaml provider.region)."
  type        = string
  default     = "us-west-2"
}

variable "cluster_name" {
  description = "Ray cluster name; must equal cluster_name in infra/aws/cluster.yaml (the head may only stop/terminate instances tagged with it)."
  type        = string
  default     = "lmjobs"
}

variable "bucket_name" {
  description = "Name of the checkpoint/data bucket; empty = CLUSTER_NAME-ACCOUNT_ID-REGION (globally unique)."
  type        = string
  default     = ""
}

variable "checkpoint_noncurrent_days" {
  description = "Days a replaced or deleted object version under checkpoints/ is kept before it expires."
  type        = number
  default     = 14

  validation {
    condition     = var.checkpoint_noncurrent_days >= 1
    error_message = "checkpoint_noncurrent_days must be at least 1."
  }
}

variable "noncurrent_days" {
  description = "Days any other replaced or deleted object version is kept before it expires."
  type        = number
  default     = 90

  validation {
    condition     = var.noncurrent_days >= 1
    error_message = "noncurrent_days must be at least 1."
  }
}

variable "abort_multipart_days" {
  description = "Days after which incomplete multipart uploads (e.g. from a killed checkpoint write) are aborted."
  type        = number
  default     = 3
}
