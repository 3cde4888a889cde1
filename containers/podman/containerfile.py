"""Translate containers/dropinf.def (Apptainer) into a Containerfile for podman/buildah.

    python3 containers/podman/containerfile.py containers/dropinf.def BASE_IMAGE > Containerfile

%files become COPY lines, %post becomes one RUN of the same shell text (base64: buildah 1.28 has
no heredocs), %environment exports become ENV lines. Only the base image differs (the caller's).
"""
from __future__ import annotations

import base64
import re
import sys


def sections(text: str) -> dict[str, str]:
    return dict(re.findall(r"^%(\w+)\n(.*?)(?=^%\w+\n|\Z)", text, flags=re.S | re.M))


def containerfile(definition: str, base: str) -> str:
    sec = sections(definition)
    lines = [f"FROM {base}"]
    for line in sec["files"].strip().splitlines():
        src, dst = line.split()
        lines.append(f"COPY {src} {dst}")
    post = base64.b64encode(sec["post"].encode()).decode()
    lines.append(f"RUN echo {post} | base64 -d > /tmp/post.sh && sh -e /tmp/post.sh && rm /tmp/post.sh")
    for m in re.finditer(r"export (\w+)=(\S+)", sec.get("environment", "")):
        lines.append(f"ENV {m.group(1)}={m.group(2)}")
    lines.append("ENTRYPOINT []")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        sys.stdout.write(containerfile(f.read(), sys.argv[2]))
