//! Placeholder: filled in by the training-stack work.
