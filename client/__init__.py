"""gradserve client SDK: numpy in, numpy out, over gRPC. Needs only grpcio, protobuf and numpy."""

__version__ = "0.1.0"
