output "bucket_name" {
  description = "The checkpoint/data bucket."
  value       = aws_s3_bucket.store.bucket
}

output "bucket_uri" {
  description = "Prefix for specs: data under BUCKET_URI/data/, output.root = BUCKET_URI/checkpoints."
  value       = "s3://${aws_s3_bucket.store.bucket}"
}

output "head_instance_profile_arn" {
  description = "IamInstanceProfile.Arn of the head node type in infra/aws/cluster.yaml."
  value       = aws_iam_instance_profile.head.arn
}

output "worker_instance_profile_arn" {
  description = "IamInstanceProfile.Arn of the worker node types in infra/aws/cluster.yaml."
  value       = aws_iam_instance_profile.worker.arn
}

output "kms_key_arn" {
  description = "The bucket's encryption key."
  value       = aws_kms_key.store.arn
}
