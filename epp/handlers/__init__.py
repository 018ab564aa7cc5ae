"""The ext_proc face of the picker (imports nothing itself, so `epp.handlers.protocol`
stays cheap to import):

    protocol.py   the ext_proc names, once (method path, headers, metadata keys, limits)
    stream.py     ExtProcHandler / ExtProcStream: the per-Envoy-stream state machine
    replies.py    ProcessingResponse framing
    transport.py  the one interface between the state machine and a transport
    grpcio.py     the grpc.aio transport
    h2/           the native HTTP/2 transport (frames, calls, connection, server; hpack)
    api.py        the project's own gRPC API (ListEndpoints, Explain)
"""
