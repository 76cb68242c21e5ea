"""gRPC calls to the lab's echo (labecho.Echo) with Python's grpcio, the
messages encoded by hand (no generated code). One line per result.

Usage: grpc_client.py TARGET CALL [N] [--authority HOST] [--meta k=v]
CALL: unary | server N | client N | bidi N | fail N CODE
"""

import os
import sys
import threading
import time

os.environ.setdefault("GRPC_DNS_RESOLVER", "native")
import grpc  # noqa: E402

TIMEOUT = 60


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode(text="", count=0, code=None, delay_ms=0):
    out = bytearray()
    if text:
        t = text.encode()
        out += b"\x0a" + varint(len(t)) + t
    if count:
        out += b"\x18" + varint(count)
    if delay_ms:
        out += b"\x20" + varint(delay_ms)
    if code is not None:
        # FailNext: n = 1 (here `count`), code = 2.
        out = bytearray(b"\x08" + varint(count) + b"\x10" + varint(code))
    return bytes(out)


def decode(b):
    msg = {"text": "", "pod": "", "count": 0}
    i = 0
    while i < len(b):
        key = b[i]
        i += 1
        field, wire = key >> 3, key & 7
        n, shift = 0, 0
        while True:
            c = b[i]
            i += 1
            n |= (c & 0x7F) << shift
            shift += 7
            if not c & 0x80:
                break
        if wire == 2:
            v = b[i : i + n].decode()
            i += n
            msg[{1: "text", 2: "pod"}.get(field, "other")] = v
        else:
            msg["count"] = n
    return msg


def main():
    target, call = sys.argv[1], sys.argv[2]
    args = sys.argv[3:]
    options = []
    if "--authority" in args:
        options.append(("grpc.default_authority", args[args.index("--authority") + 1]))
    meta = []
    if "--meta" in args:
        k, v = args[args.index("--meta") + 1].split("=", 1)
        meta.append((k, v))
    # No client-side retries: what is retried is the waypoint's doing.
    options.append(("grpc.enable_retries", 0))
    ch = grpc.insecure_channel(target, options=options)
    ident = lambda b: b  # noqa: E731
    m = lambda name: f"/labecho.Echo/{name}"  # noqa: E731
    try:
        if call == "unary":
            # --deadline S --delay-ms N: a call slower than its deadline.
            deadline = float(args[args.index("--deadline") + 1]) if "--deadline" in args else TIMEOUT
            delay = int(args[args.index("--delay-ms") + 1]) if "--delay-ms" in args else 0
            r = ch.unary_unary(m("Unary"), request_serializer=ident, response_deserializer=decode)
            reply, c = r.with_call(encode("hi", delay_ms=delay), timeout=deadline, metadata=meta)
            print(f"unary {reply['text']} pod={reply['pod']} code={c.code().name}")
        elif call == "fail":
            n, code = int(args[0]), int(args[1])
            r = ch.unary_unary(m("SetFailNext"), request_serializer=ident, response_deserializer=decode)
            print(f"set {r(encode(count=n, code=code), timeout=TIMEOUT)['text']}")
        elif call == "server":
            n = int(args[0])
            r = ch.unary_stream(m("ServerStream"), request_serializer=ident, response_deserializer=decode)
            pods = set()
            got = 0
            for reply in r(encode("s", count=n), timeout=TIMEOUT, metadata=meta):
                got += 1
                pods.add(reply["pod"])
            print(f"server {got}")
            print(f"server pods={','.join(sorted(pods))}")
        elif call == "client":
            n = int(args[0])
            r = ch.stream_unary(m("ClientStream"), request_serializer=ident, response_deserializer=decode)
            reply = r((encode(f"c{i}", count=i) for i in range(n)), timeout=TIMEOUT, metadata=meta)
            print(f"client {reply['count']} last={reply['text']}")
        elif call == "bidi":
            bidi(ch, m, ident, int(args[0]), meta)
        print("ok")
    except grpc.RpcError as e:
        print(f"error {e.code().name} {e.details()}")


def bidi(ch, m, ident, n, meta):
    """The first message alone, its reply awaited with the stream still
    open (no half-close), then the rest; every reply counted."""
    first_reply = threading.Event()
    half_closed = threading.Event()

    def requests():
        yield encode("m0", count=0)
        if not first_reply.wait(TIMEOUT):
            return
        for i in range(1, n):
            yield encode(f"m{i}", count=i)
        half_closed.set()

    r = ch.stream_stream(m("Bidi"), request_serializer=ident, response_deserializer=decode)
    got = 0
    before_half_close = None
    started = time.time()
    for reply in r(requests(), timeout=TIMEOUT, metadata=meta):
        if got == 0:
            before_half_close = not half_closed.is_set()
            first_reply.set()
        got += 1
    print(f"bidi first-reply-before-half-close={before_half_close} replies={got} in {time.time() - started:.1f}s")


if __name__ == "__main__":
    main()
