#!/usr/bin/env bash
# `make image`: the rrt OCI image built on this machine without pulling a base image. buildah
# starts from scratch and adds the four release binaries (rrt, rrt-worker, rrt-router,
# rrt-coordinator), the shared libraries they link (this machine's glibc and libgcc, found by
# ldd), a user database with the manifests' non-root user (uid/gid 10001) and a /tmp. No shell,
# no package manager, no build tools. The image is tagged IMAGE in the local container storage
# (`podman run IMAGE rrt --help`) and saved as an OCI archive (`skopeo copy
# oci-archive:ARCHIVE docker://REGISTRY/rrt:TAG` pushes it). deploy/docker/Dockerfile builds the
# same layout for users with a registry and a Docker builder.
#
# Usage: scripts/image.sh IMAGE ARCHIVE [BINARIES_DIR]
# Rebuilds only when the binaries changed (their digest is a label of the image).
set -euo pipefail

image=${1:?usage: scripts/image.sh IMAGE ARCHIVE [BINARIES_DIR]}
archive=${2:?usage: scripts/image.sh IMAGE ARCHIVE [BINARIES_DIR]}
bins=${3:-target/release}
binaries=(rrt rrt-worker rrt-router rrt-coordinator)
uid=10001

for b in "${binaries[@]}"; do
    [ -x "$bins/$b" ] || { echo "image: $bins/$b missing (run \`make build\`)" >&2; exit 1; }
done
digest=$(cd "$bins" && sha256sum "${binaries[@]}" | sha256sum | cut -c1-64)
current=$(podman image inspect --format '{{index .Labels "io.rrt.binaries"}}' "$image" 2>/dev/null || true)
if [ "$current" = "$digest" ] && [ -f "$archive" ]; then
    echo "image: $image is up to date ($archive)"
    exit 0
fi

ctr=$(buildah from --name "rrt-image-$$" scratch)
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
root=$(buildah mount "$ctr")

install -d -m 755 "$root/usr/local/bin" "$root/etc"
install -d -m 1777 "$root/tmp"
install -d -m 755 -o $uid -g $uid "$root/home/rrt" "$root/models"
for b in "${binaries[@]}"; do
    install -m 755 "$bins/$b" "$root/usr/local/bin/$b"
done
# Every library the binaries load, at the path the dynamic loader looks for it (the loader
# itself included: ldd prints it without "=>").
for b in "${binaries[@]}"; do ldd "$bins/$b"; done |
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u |
    while read -r lib; do
        install -D -m 755 "$(readlink -f "$lib")" "$root$lib"
    done
cat > "$root/etc/passwd" <<EOF
root:x:0:0:root:/root:/sbin/nologin
rrt:x:$uid:$uid:rrt:/home/rrt:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
EOF
cat > "$root/etc/group" <<EOF
root:x:0:
rrt:x:$uid:
nogroup:x:65534:
EOF
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
buildah umount "$ctr" >/dev/null

version=$("$bins/rrt" --version | awk '{ print $2 }')
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
buildah config \
    --user "$uid:$uid" \
    --workingdir /home/rrt \
    --env PATH=/usr/local/bin \
    --env HOME=/home/rrt \
    --cmd '["rrt", "--help"]' \
    --port 50050 --port 50051 --port 50061 --port 8080 \
    --port 9100 --port 9101 --port 9103 \
    --label org.opencontainers.image.title=rrt \
    --label "org.opencontainers.image.description=rrt: Relaxed Recursive Transformers serving (rrt, rrt-worker, rrt-router, rrt-coordinator)" \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.revision=$revision" \
    --label org.opencontainers.image.licenses=Apache-2.0 \
    --label "io.rrt.binaries=$digest" \
    "$ctr"

old=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
buildah commit --quiet --format oci --rm "$ctr" "$image" >/dev/null
trap - EXIT
if [ -n "$old" ] && [ "$old" != "$(podman image inspect --format '{{.Id}}' "$image")" ]; then
    podman rmi "$old" >/dev/null 2>&1 || true
fi
mkdir -p "$(dirname "$archive")"
rm -f "$archive"
skopeo copy --quiet "containers-storage:$image" "oci-archive:$archive:$image"
size=$(podman image inspect --format '{{.Size}}' "$image")
echo "image: $image ($((size / 1024 / 1024)) MiB, binaries $digest), saved to $archive"
