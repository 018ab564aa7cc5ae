"""`epp endpoints` and `epp explain`: clients of a running picker's project API.

    epp endpoints --addr 127.0.0.1:9002 [--tls [--ca-file F]|--insecure-skip-verify|--insecure] [--json]
    epp explain --addr 127.0.0.1:9002 --model m --prompt "..." [--chat] [--header k=v ...]
    epp explain --addr 127.0.0.1:9002 --body-file request.json [--path /v1/chat/completions]

TLS is the default and the server's certificate is verified: against --ca-file (the
picker's tls.crt, or the CA that signed it) or else the system's roots, for the --addr
host or --server-name. The certificate a picker generates for itself is known to no
one, so against it either give the picker a --cert-path and the client that tls.crt,
or ask explicitly for --insecure-skip-verify (encrypted, not authenticated). --insecure
speaks plaintext.

The API is on the picker's --api-port when it has one; else on --grpc-port with the
grpcio transport, and on --grpc-port + 10 with --ext-proc-transport=native (e.g.
--addr 127.0.0.1:9012).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import ssl
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf import json_format

from epp.netaddr import join_hostport, parse_hostport
from proto import epp_api_pb2 as pb
from proto import epp_api_pb2_grpc as pb_grpc

MULTI_COMMAND = True


# ---------------------------------------------------------------------------- connection
def fetch_server_certificate(host: str, port: int, timeout: float) -> bytes:
    """The PEM certificate the server presents (unverified: it is what we will trust)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])  # gRPC servers may refuse a handshake without it
    with socket.create_connection((host, port), timeout=timeout) as sock:
        with ctx.wrap_socket(sock, server_hostname=host if not _is_ip(host) else None) as tls:
            der = tls.getpeercert(binary_form=True)
    if not der:
        raise ConnectionError(f"{host}:{port} presented no certificate")
    return ssl.DER_cert_to_PEM_cert(der).encode()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def certificate_names(pem: bytes) -> tuple[list[str], list[str]]:
    """(DNS names and common name, IP addresses) the certificate is valid for."""
    fd, path = tempfile.mkstemp(suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        info = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]  # stdlib has no public decoder
    except Exception:  # noqa: BLE001 - an undecodable cert just gets no override
        return [], []
    finally:
        os.unlink(path)
    dns = [v for k, v in info.get("subjectAltName", ()) if k == "DNS"]
    ips = [v.strip() for k, v in info.get("subjectAltName", ()) if k == "IP Address"]
    for rdn in info.get("subject", ()):
        dns += [v for k, v in rdn if k == "commonName" and v not in dns]
    return dns, ips


def open_channel(addr: str, tls: bool, timeout: float, *, ca_file: str = "", skip_verify: bool = False,
                 server_name: str = "") -> grpc.Channel:
    """A channel to the picker: plaintext, TLS verified against `ca_file` (else the system's
    roots), or, only when `skip_verify` is asked for, TLS trusting whatever certificate the
    server presents."""
    host, port = parse_hostport(addr, "--addr", ip=False)
    target = join_hostport(host, port)
    if not tls:
        return grpc.insecure_channel(target)
    options: list[tuple[str, str]] = []
    if skip_verify:
        # grpcio cannot skip verification: trust exactly the certificate the server presents.
        roots: bytes | None = fetch_server_certificate(host, port, timeout)
        dns, ips = certificate_names(roots)
        covered = host in dns or any(_same_ip(host, ip) for ip in ips)
        if not covered and dns:
            options.append(("grpc.ssl_target_name_override", dns[0]))
    else:
        try:
            roots = Path(ca_file).read_bytes() if ca_file else None
        except OSError as e:
            raise ValueError(f"--ca-file: cannot read {ca_file}: {e.strerror}") from None
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots), options=options)


MAX_PAGES = 10_000  # ListEndpoints pages followed before giving up (a server that never ends)


def list_all_endpoints(stub: pb_grpc.EndpointPickerStub, timeout: float) -> pb.ListEndpointsResponse:
    """Every page of ListEndpoints, as one response."""
    out = pb.ListEndpointsResponse()
    token = ""
    for _ in range(MAX_PAGES):
        page = stub.ListEndpoints(pb.ListEndpointsRequest(page_token=token), timeout=timeout)
        out.endpoints.extend(page.endpoints)
        out.synced = page.synced
        if not page.next_page_token:
            return out
        if page.next_page_token == token:
            raise ValueError(f"the server repeated page token {token[:40]!r}")
        token = page.next_page_token
    raise ValueError(f"more than {MAX_PAGES} pages of endpoints")


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


# ---------------------------------------------------------------------------- endpoints
def format_endpoints(resp: pb.ListEndpointsResponse) -> str:
    header = ("NAME", "ADDRESS", "WAIT", "RUN", "KV%", "LORA run/wait/max", "BLOCKS", "AGE", "OK",
              "INFLIGHT", "TOKENS", "LABELS")
    rows = [header]
    for e in resp.endpoints:
        m = e.metrics
        host = f"[{e.address}]" if ":" in e.address else e.address
        lora = f"{','.join(m.running_lora_adapters) or '-'}/{','.join(m.waiting_lora_adapters) or '-'}/{m.max_lora}"
        blocks = f"{m.num_gpu_blocks}x{m.block_size}" if m.block_size or m.num_gpu_blocks else "-"
        age = "never" if m.age_seconds < 0 else f"{m.age_seconds:.2f}s"
        labels = (",".join(f"{k}={v}" for k, v in sorted(e.labels.items())) or "-") + (" (cut)" if e.truncated else "")
        rows.append((e.name, f"{host}:{e.port}", str(m.waiting_queue_size), str(m.running_requests_size),
                     f"{m.kv_cache_usage * 100:.1f}", lora, blocks, age, "yes" if m.ok else "no",
                     str(e.in_flight_requests), str(e.in_flight_tokens), labels))
        if e.status:  # what plugins report (e.g. the KV-event stream and its lag), under the row
            rows.append(("", "", "", "", "", "", "", "", "", "", "",
                         "  " + " ".join(f"{k}={v}" for k, v in sorted(e.status.items()))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(f"{len(resp.endpoints)} endpoints{'' if resp.synced else ' (endpoint source not synced yet)'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- explain
def _fmt(x: float) -> str:
    return f"{x:.4g}"


def format_explain(resp: pb.ExplainResponse) -> str:
    lines = []
    if resp.HasField("request"):
        r = resp.request
        model = r.incoming_model if r.target_model in ("", r.incoming_model) else \
            f"{r.incoming_model} -> {r.target_model} (rewritten)"
        extra = f", objective {r.objective}" if r.objective else ""
        lines.append(f"request: model {model or '-'}, {r.kind or 'unknown'}, priority {r.priority}{extra}"
                     f"{', stream' if r.stream else ''}, prompt {r.prompt_chars} chars")
    if resp.candidates:
        lines.append(f"candidates: {', '.join(resp.candidates)}")
    for p in resp.profiles:
        lines.append(f"profile {p.name}:")
        for f in p.filters:
            kept = ", ".join(f.kept) if f.kept else "none"
            lines.append(f"  filter {_plugin(f.name, f.type)} kept {kept}")
        for s in p.scorers:
            scores = " ".join(f"{e.endpoint}={_fmt(e.score)}" for e in s.scores)
            lines.append(f"  scorer {_plugin(s.name, s.type)} (w={_fmt(s.weight)}): {scores}")
        if p.totals:
            lines.append(f"  totals: {' '.join(f'{e.endpoint}={_fmt(e.score)}' for e in p.totals)}")
        if p.error:
            lines.append(f"  failed: {p.error}")
        elif p.picked:
            lines.append(f"  picker {p.picker or '-'} picked {', '.join(p.picked)}")
    for m in resp.prefix_matches:
        media = " ".join(f"{k}={v}" for k, v in sorted(m.blocks_by_medium.items()))
        lines.append(f"prefix {m.producer}: {m.endpoint} holds {m.matched_blocks}/{m.total_blocks} blocks "
                     f"of {m.block_size_tokens} tokens{f' ({media})' if media else ''}")
    if resp.latency_predictions:
        slo = [f"{name} {_fmt(v)} ms" for name, v in (("TTFT", resp.slo_ttft_ms), ("TPOT", resp.slo_tpot_ms)) if v > 0]
        lines.append(f"latency SLO: {', '.join(slo) or 'none (headroom = -predicted)'}")
    for p in resp.latency_predictions:
        tpot = f", TPOT {_fmt(p.tpot_ms)} ms (headroom {_fmt(p.tpot_headroom_ms)})" if p.tpot_ms else ""
        lines.append(f"latency {p.producer}: {p.endpoint} TTFT {_fmt(p.ttft_ms)} ms (headroom "
                     f"{_fmt(p.ttft_headroom_ms)}){tpot}, {'meets' if p.meets_slo else 'misses'} the SLO, "
                     f"{p.dispatched_requests} running")
    if resp.truncated:
        lines.append("(per-endpoint lists cut to fit the response)")
    if resp.error_code:
        lines.append(f"error: {resp.error_code} (HTTP {resp.http_status}) - {resp.error_message}")
    elif resp.targets:
        primary = f" (profile {resp.primary_profile})" if resp.primary_profile else ""
        lines.append(f"picked {', '.join(resp.targets)}{primary}")
    for k, v in sorted(resp.headers.items()):
        lines.append(f"sets header {k}: {v}")
    return "\n".join(lines)


def _plugin(name: str, type_: str) -> str:
    return name if not type_ or type_ == name else f"{name} ({type_})"


def explain_request(args: argparse.Namespace) -> pb.ExplainRequest:
    headers: dict[str, str] = {}
    for item in args.header:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--header: expected key=value, got {item!r}")
        headers[key.strip().lower()] = value
    if args.body_file:
        with open(args.body_file, "rb") as f:
            body = f.read()
        try:
            chat = "messages" in json.loads(body)
        except (ValueError, TypeError):
            chat = False
    else:
        if not args.model or args.prompt is None:
            raise ValueError("give --model and --prompt, or --body-file")
        chat = args.chat
        doc = ({"model": args.model, "messages": [{"role": "user", "content": args.prompt}]} if chat
               else {"model": args.model, "prompt": args.prompt})
        body = json.dumps(doc).encode()
    headers.setdefault(":path", args.path or ("/v1/chat/completions" if chat else "/v1/completions"))
    headers.setdefault(":method", "POST")
    headers.setdefault("content-type", "application/json")
    return pb.ExplainRequest(body=body, headers=headers)


# ---------------------------------------------------------------------------- main
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--addr", default="127.0.0.1:9002", help="picker gRPC address host:port (its --api-port, default grpc port + 10, when it runs "
                        "--ext-proc-transport=native)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--tls", dest="tls", action="store_true", default=True,
                      help="TLS, verifying the server's certificate (default)")
    mode.add_argument("--insecure", dest="tls", action="store_false", help="plaintext gRPC")
    mode.add_argument("--insecure-skip-verify", action="store_true",
                      help="TLS without verifying the certificate: trusts whatever the server presents")
    p.add_argument("--ca-file", default="", help="PEM certificates to verify the server with (the picker's "
                                                 "tls.crt, or its CA); default: the system's roots")
    p.add_argument("--server-name", default="", help="name the certificate must carry (default: the --addr host)")
    p.add_argument("--json", action="store_true", help="print the response as JSON")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds")


def build_parser(command: str) -> argparse.ArgumentParser:
    if command == "endpoints":
        p = argparse.ArgumentParser(prog="epp endpoints", description="List a running picker's endpoints.")
        _common(p)
        return p
    p = argparse.ArgumentParser(prog="epp explain", description="Why a request would go where it goes.")
    _common(p)
    p.add_argument("--model", default="", help="model name for --prompt")
    p.add_argument("--prompt", default=None, help="prompt text (a completions request; --chat for chat)")
    p.add_argument("--chat", action="store_true", help="send --prompt as a chat completions message")
    p.add_argument("--body-file", default="", help="JSON request body file (instead of --model/--prompt)")
    p.add_argument("--path", default="", help="request path (default from the body's shape)")
    p.add_argument("--header", action="append", default=[], metavar="K=V", help="request header (repeatable)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("endpoints", "explain"):
        print("usage: epp endpoints|explain [flags]", file=sys.stderr)
        return 2
    command = argv[0]
    args = build_parser(command).parse_args(argv[1:])
    try:
        request = explain_request(args) if command == "explain" else pb.ListEndpointsRequest()
    except (ValueError, OSError) as e:
        print(f"epp {command}: {e}", file=sys.stderr)
        return 2
    if not args.tls and (args.ca_file or args.server_name):
        print(f"epp {command}: --ca-file and --server-name need TLS (not --insecure)", file=sys.stderr)
        return 2
    try:
        with open_channel(args.addr, args.tls, args.timeout, ca_file=args.ca_file,
                          skip_verify=args.insecure_skip_verify, server_name=args.server_name) as channel:
            stub = pb_grpc.EndpointPickerStub(channel)
            if command == "endpoints":
                resp = list_all_endpoints(stub, args.timeout)
            else:
                resp = stub.Explain(request, timeout=args.timeout)
    except grpc.RpcError as e:
        details = e.details() or ""
        hint = ""
        if args.tls and not args.insecure_skip_verify and any(w in details.lower() for w in ("handshake", "certif")):
            hint = " (verify the picker's certificate with --ca-file, or --insecure-skip-verify)"
        print(f"epp {command}: {args.addr}: {e.code().name}: {details}{hint}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"epp {command}: {args.addr}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json_format.MessageToJson(resp, preserving_proto_field_name=True))
    else:
        print(format_endpoints(resp) if command == "endpoints" else format_explain(resp))
    return 0
