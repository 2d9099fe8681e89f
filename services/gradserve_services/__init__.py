"""gradserve service side: engine (numpy autodiff), optimizers, Ray cluster, gRPC gateway, metrics, CLI."""

__version__ = "0.1.0"
