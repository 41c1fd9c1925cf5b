"""The pipeline inside a worker process: read, decode (OpenCV), augment, resize and collate one
batch straight into its buffer, with the decoded-sample cache beside it."""
