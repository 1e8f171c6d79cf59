"""What every layer runs on: settings, devices and precision, text encoder, micro-batchers."""
