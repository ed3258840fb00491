"""The model on a device: TorchScript export, enrolment and verification."""
