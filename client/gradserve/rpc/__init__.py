"""RPC plumbing shared by the SDK and the gateway: chunk framing (`frames`), each method's codec
and streaming kind with the stub and server registration built from them (`methods`), channel and
server options (`options`) and the mapping of the exception tree to and from gRPC status codes
(`status`). Nothing else on either side spells out a gRPC method kind, option or status code."""
