#!/usr/bin/env python3
"""Assembles an OCI image from layer tarballs, with no daemon and no registry.

    oci-image.py --out image.tar --name uwsgi-it.local/operator:dev --created 1700000000 \
        --layer rootfs.tar --layer app.tar --entrypoint '["/usr/local/bin/app"]' --user 65532:65532

The output is an OCI image layout packed as one tar (what `ctr images import` and
`skopeo copy oci-archive:` read). Everything in it is derived from the inputs and `--created`
(SOURCE_DATE_EPOCH): gzip headers carry no time or name and the tar's own entries are fixed,
so the same layers give the same digests. Prints the manifest digest on stdout.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def add_blob(blobs, data=None, path=None):
    """Stores a blob by content address and returns (digest, size)."""
    if path is not None:
        digest = sha256_file(path)
        target = os.path.join(blobs, digest)
        if not os.path.exists(target):
            shutil.move(path, target)
        return "sha256:" + digest, os.path.getsize(target)
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as f:
        f.write(data)
    return "sha256:" + digest, len(data)


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output OCI layout tar")
    parser.add_argument("--name", required=True, help="image reference, e.g. host/repo:tag")
    parser.add_argument("--created", type=int, required=True, help="SOURCE_DATE_EPOCH")
    parser.add_argument("--layer", action="append", default=[], help="uncompressed layer tar")
    parser.add_argument("--entrypoint", default=None, help="JSON list")
    parser.add_argument("--cmd", default=None, help="JSON list")
    parser.add_argument("--user", default=None)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE")
    parser.add_argument("--label", action="append", default=[], help="KEY=VALUE")
    args = parser.parse_args()

    created = __import__("datetime").datetime.fromtimestamp(
        args.created, __import__("datetime").timezone.utc
    ).strftime("%Y-%m-%dT%H:%M:%SZ")
    work = tempfile.mkdtemp(prefix="oci-image-", dir=os.path.dirname(os.path.abspath(args.out)))
    try:
        blobs = os.path.join(work, "blobs", "sha256")
        os.makedirs(blobs)
        layers, diff_ids = [], []
        for layer in args.layer:
            diff_ids.append("sha256:" + sha256_file(layer))
            compressed = os.path.join(work, "layer.tar.gz")
            with open(layer, "rb") as src, open(compressed, "wb") as raw:
                # mtime=0 and no file name: the gzip header depends on nothing but the bytes.
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
                    shutil.copyfileobj(src, gz, 1 << 20)
            digest, size = add_blob(blobs, path=compressed)
            layers.append({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": digest,
                "size": size,
            })

        config = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
        config["Env"] += args.env
        if args.entrypoint:
            config["Entrypoint"] = json.loads(args.entrypoint)
        if args.cmd:
            config["Cmd"] = json.loads(args.cmd)
        if args.user:
            config["User"] = args.user
        if args.workdir:
            config["WorkingDir"] = args.workdir
        if args.label:
            config["Labels"] = dict(label.split("=", 1) for label in args.label)
        image_config = {
            "created": created,
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": created, "created_by": "hack/oci-image.py"} for _ in layers],
        }
        config_digest, config_size = add_blob(blobs, data=canonical(image_config))
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_size,
            },
            "layers": layers,
        }
        manifest_digest, manifest_size = add_blob(blobs, data=canonical(manifest))
        tag = args.name.rsplit(":", 1)[1] if ":" in args.name.rsplit("/", 1)[-1] else "latest"
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest_size,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    # containerd names imported images by the first; skopeo/OCI tools by the second.
                    "io.containerd.image.name": args.name,
                    "org.opencontainers.image.ref.name": tag,
                },
            }],
        }
        files = {
            "oci-layout": canonical({"imageLayoutVersion": "1.0.0"}),
            "index.json": canonical(index),
        }
        tmp_out = args.out + ".tmp"
        with tarfile.open(tmp_out, "w", format=tarfile.PAX_FORMAT) as tar:
            def entry(name, size, mode=0o644, kind=tarfile.REGTYPE):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.type = size, mode, kind
                info.mtime, info.uid, info.gid, info.uname, info.gname = args.created, 0, 0, "", ""
                return info
            for name in ("blobs", "blobs/sha256"):
                tar.addfile(entry(name, 0, 0o755, tarfile.DIRTYPE))
            for blob in sorted(os.listdir(blobs)):
                path = os.path.join(blobs, blob)
                with open(path, "rb") as f:
                    tar.addfile(entry("blobs/sha256/" + blob, os.path.getsize(path)), f)
            for name, data in files.items():
                tar.addfile(entry(name, len(data)), io.BytesIO(data))
        os.replace(tmp_out, args.out)
        print(manifest_digest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
