"""gRPC only: server construction, servicers, proto<->domain converters, the error->status table."""
