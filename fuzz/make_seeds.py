#!/usr/bin/env python3
"""Turn the files of real unencrypted repositories into seed corpora for the
fuzz targets. Called by seeds.sh; needs the `zstd` command.

usage: make_seeds.py CORPUS_DIR REPO [REPO...]
"""
import hashlib
import json
import os
import struct
import subprocess
import sys

SNAP_ID = "00112233445566778899aabbccddeeff"
TAG = 16
HDR = 16


def unzstd(b):
    return subprocess.run(["zstd", "-dc"], input=b, capture_output=True, check=True).stdout


def zstd(b):
    return subprocess.run(["zstd", "-c", "-3"], input=b, capture_output=True, check=True).stdout


def header(magic, flags):
    return magic + struct.pack("<H", 1) + bytes([flags]) + bytes(5)


def files(repo, sub):
    d = os.path.join(repo, sub)
    out = []
    for root, _, names in os.walk(d):
        for n in sorted(names):
            with open(os.path.join(root, n), "rb") as f:
                out.append(f.read())
    return out


def main():
    corpus, repos = sys.argv[1], sys.argv[2:]
    seeds = {}

    def add(target, data):
        d = os.path.join(corpus, target)
        os.makedirs(d, exist_ok=True)
        name = hashlib.sha1(data).hexdigest()
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
        seeds[target] = seeds.get(target, 0) + 1

    def sealed_seeds(kind, file_bytes, body):
        # Raw, fix-tag and seal framings (see ekko_fuzz::Framing).
        if file_bytes is not None:
            add("sealed_files", bytes([kind]) + file_bytes)
            add("sealed_files", bytes([kind + 16]) + file_bytes)
        add("sealed_files", bytes([kind + 32]) + body)

    for repo in repos:
        with open(os.path.join(repo, "config"), "rb") as f:
            config = f.read()
        keys = files(repo, "keys")
        add("config", struct.pack("<H", len(config)) + config)
        for k in keys:
            add("config", struct.pack("<H", len(config)) + config + k)
            add("decoders", k)
        add("decoders", config)

        for snap in files(repo, "snapshots"):
            add("decoders", snap)
            if snap[10] & 1 == 0:
                continue
            body = json.loads(unzstd(snap[HDR + TAG:]))
            body["id"] = SNAP_ID
            plain = json.dumps(body).encode()
            add("decoders", plain)
            f = header(b"EKKOSNAP", 1) + bytes(TAG) + zstd(plain)
            sealed_seeds(0, f, plain)
            # A manifest left uncompressed (flags 0) lets the fuzzer edit it.
            sealed_seeds(0, header(b"EKKOSNAP", 0) + bytes(TAG) + plain, plain)

        for idx in files(repo, "index"):
            add("decoders", idx)
            body = unzstd(idx[HDR + TAG:])
            add("decoders", body)
            sealed_seeds(1, idx, body)
            sealed_seeds(1, header(b"EKKOINDX", 0) + bytes(TAG) + body, body)

        for prot in files(repo, "protect"):
            body = json.loads(unzstd(prot[HDR + TAG:]))
            body["snapshot"] = SNAP_ID
            plain = json.dumps(body).encode()
            sealed_seeds(4, header(b"EKKOPROT", 0) + bytes(TAG) + plain, plain)

        for pack in files(repo, "packs"):
            tlen = struct.unpack("<I", pack[-16:-12])[0]
            tstart = len(pack) - 16 - tlen
            trailer = pack[tstart + TAG : -16]
            add("decoders", trailer)
            add("decoders", pack[-16:])
            if len(pack) <= 1 << 16:
                add("pack_trailer", bytes([0]) + pack)
                add("pack_trailer", bytes([1]) + pack)
                blobs = pack[HDR:tstart]
                add("pack_trailer", bytes([2]) + struct.pack("<H", len(blobs)) + blobs + trailer)
            else:
                add("pack_trailer", bytes([2]) + struct.pack("<H", 0) + trailer)
            # Map nodes: blobs of kind 1 (stored uncompressed).
            n = struct.unpack("<I", trailer[:4])[0]
            for i in range(n):
                e = trailer[8 + 56 * i : 8 + 56 * (i + 1)]
                off, stored = struct.unpack("<QI", e[32:44])
                if e[48] == 1:
                    add("decoders", pack[off + TAG : off + stored])

    lock = {"exclusive": False, "gc": True, "host": "h", "pid": 1,
            "time": "2026-11-26T00:00:00Z", "purpose": "prune"}
    plain = json.dumps(lock).encode()
    sealed_seeds(2, header(b"EKKOLOCK", 0) + bytes(TAG) + plain, plain)
    mark = {"time": "2026-11-26T00:00:00Z", "host": "h", "grace_ms": 86400000,
            "skew_ms": 600000, "packs": ["0f42da2cefe161a8bbf500d59f73d7c1"]}
    plain = json.dumps(mark).encode()
    sealed_seeds(3, header(b"EKKOGCMK", 0) + bytes(TAG) + plain, plain)
    for t, n in sorted(seeds.items()):
        print(f"{t}: {n} seeds")


main()
