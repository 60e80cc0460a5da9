# The bucket that holds datasets and checkpoints, and the EC2 roles of the Ray cluster nodes.
# Workers may only read and write that bucket; the head may also launch and stop this cluster's
# workers (the Ray autoscaler runs on it).

provider "aws" {
  region = var.region

  default_tags {
    tags = {
      project = "lmjobs"
      cluster = var.cluster_name
    }
  }
}

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

locals {
  account_id  = data.aws_caller_identity.current.account_id
  partition   = data.aws_partition.current.partition
  bucket_name = coalesce(var.bucket_name, "${var.cluster_name}-${local.account_id}-${var.region}")
  # prefix of this account's EC2 resource ARNs in the region
  ec2_arn = "arn:${local.partition}:ec2:${var.region}:${local.account_id}"
}

# ---------------------------------------------------------------------------------------------
# Bucket: private, versioned, encrypted with its own key, TLS only.

resource "aws_kms_key" "store" {
  description             = "lmjobs ${var.cluster_name}: S3 bucket encryption"
  enable_key_rotation     = true
  deletion_window_in_days = 30
}

resource "aws_kms_alias" "store" {
  name          = "alias/${var.cluster_name}-store"
  target_key_id = aws_kms_key.store.key_id
}

resource "aws_s3_bucket" "store" {
  bucket = local.bucket_name
}

resource "aws_s3_bucket_ownership_controls" "store" {
  bucket = aws_s3_bucket.store.id

  rule {
    # ACLs off: access is decided by IAM and the bucket policy alone
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "store" {
  bucket = aws_s3_bucket.store.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "store" {
  bucket = aws_s3_bucket.store.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "store" {
  bucket = aws_s3_bucket.store.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.store.arn
    }
    # one data key per bucket, not per object: checkpoint shards are many objects
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "store" {
  bucket = aws_s3_bucket.store.id
  # rules on a versioned bucket need versioning to exist first
  depends_on = [aws_s3_bucket_versioning.store]

  # Training rotates checkpoints (train.keep_checkpoints): in a versioned bucket every rotated
  # checkpoint would otherwise stay as noncurrent versions forever.
  rule {
    id     = "checkpoints-noncurrent"
    status = "Enabled"

    filter {
      prefix = "checkpoints/"
    }

    noncurrent_version_expiration {
      noncurrent_days = var.checkpoint_noncurrent_days
    }

    expiration {
      expired_object_delete_marker = true
    }
  }

  rule {
    id     = "all-noncurrent"
    status = "Enabled"

    filter {}

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_days
    }
  }

  rule {
    id     = "abort-incomplete-multipart"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = var.abort_multipart_days
    }
  }
}

data "aws_iam_policy_document" "bucket" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.store.arn, "${aws_s3_bucket.store.arn}/*"]

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

  statement {
    sid       = "DenyTlsBelow12"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.store.arn, "${aws_s3_bucket.store.arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "NumericLessThan"
      variable = "s3:TlsVersion"
      values   = ["1.2"]
    }
  }
}

resource "aws_s3_bucket_policy" "store" {
  bucket = aws_s3_bucket.store.id
  policy = data.aws_iam_policy_document.bucket.json
  # a policy written before the public access block could briefly be evaluated without it
  depends_on = [aws_s3_bucket_public_access_block.store]
}

# ---------------------------------------------------------------------------------------------
# Node roles.

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

# What every node needs: this bucket, nothing else.  No s3:DeleteObjectVersion: a node can
# delete (a delete marker) but not destroy history; the lifecycle rules do that.
data "aws_iam_policy_document" "bucket_access" {
  statement {
    sid       = "ListTheBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [aws_s3_bucket.store.arn]
  }

  statement {
    sid = "ReadWriteObjects"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${aws_s3_bucket.store.arn}/*"]
  }

  statement {
    sid       = "UseTheBucketKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.store.arn]
  }
}

# What the head adds: the Ray autoscaler launches, tags and removes this cluster's workers.
data "aws_iam_policy_document" "autoscaler" {
  # AWS has no resource-level permissions for these read-only Describe calls: "*" is the only
  # resource they accept.  They are the single exception the tests allow.
  statement {
    sid = "DescribeForScheduling"
    actions = [
      "ec2:DescribeInstances",
      "ec2:DescribeInstanceStatus",
      "ec2:DescribeInstanceTypes",
      "ec2:DescribeImages",
      "ec2:DescribeSubnets",
      "ec2:DescribeSecurityGroups",
      "ec2:DescribeKeyPairs",
    ]
    resources = ["*"]
  }

  statement {
    sid     = "LaunchWorkers"
    actions = ["ec2:RunInstances"]
    resources = [
      "${local.ec2_arn}:instance/*",
      "${local.ec2_arn}:volume/*",
      "${local.ec2_arn}:network-interface/*",
      "${local.ec2_arn}:subnet/*",
      "${local.ec2_arn}:security-group/*",
      "${local.ec2_arn}:key-pair/*",
      "${local.ec2_arn}:spot-instances-request/*",
      "arn:${local.partition}:ec2:${var.region}::image/*",
    ]
  }

  statement {
    sid     = "TagWorkers"
    actions = ["ec2:CreateTags"]
    resources = [
      "${local.ec2_arn}:instance/*",
      "${local.ec2_arn}:volume/*",
      "${local.ec2_arn}:network-interface/*",
      "${local.ec2_arn}:spot-instances-request/*",
    ]
  }

  statement {
    sid       = "StopOnlyThisClustersNodes"
    actions   = ["ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"]
    resources = ["${local.ec2_arn}:instance/*"]

    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/ray-cluster-name"
      values   = [var.cluster_name]
    }
  }

  statement {
    sid       = "PassTheWorkerRole"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.worker.arn]

    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "worker" {
  name               = "${var.cluster_name}-ray-worker"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy" "worker_bucket" {
  name   = "bucket-access"
  role   = aws_iam_role.worker.id
  policy = data.aws_iam_policy_document.bucket_access.json
}

resource "aws_iam_instance_profile" "worker" {
  name = "${var.cluster_name}-ray-worker"
  role = aws_iam_role.worker.name
}

resource "aws_iam_role" "head" {
  name               = "${var.cluster_name}-ray-head"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy" "head_bucket" {
  name   = "bucket-access"
  role   = aws_iam_role.head.id
  policy = data.aws_iam_policy_document.bucket_access.json
}

resource "aws_iam_role_policy" "head_autoscaler" {
  name   = "ray-autoscaler"
  role   = aws_iam_role.head.id
  policy = data.aws_iam_policy_document.autoscaler.json
}

resource "aws_iam_instance_profile" "head" {
  name = "${var.cluster_name}-ray-head"
  role = aws_iam_role.head.name
}
