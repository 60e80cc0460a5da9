terraform {
  required_version = ">= 1.6"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # the split S3 bucket resources (versioning, encryption, lifecycle, ...) are 4.x+;
      # lifecycle `filter {}` semantics are stable across 5.x and 6.x
      version = ">= 5.40, < 7.0"
    }
  }
}
