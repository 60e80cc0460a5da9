"""Turning raw and labelled data into datasets the trainers stream."""
