#!/bin/sh
# Regenerates the committed seed corpora (fuzz/seeds/<target>/) from real
# images (qemu-img, qemu-io) and real NBD traffic (nbdinfo, nbdcopy,
# qemu-img, qemu-io, libnbd against qemu-nbd). See gen.py.
set -eu
cd "$(dirname "$0")"
# Inputs that once broke tidemark (regress-*) stay; everything else is remade.
for t in nbd_handshake nbd_transmission qmp_input qcow2_header qcow2_tables qcow2_bitmap_dir qcow2_image; do
    [ -d "$t" ] && find "$t" -type f ! -name 'regress-*' -delete
done
# libnbd's Python binding is the distribution's, not a virtualenv's.
exec /usr/bin/python3 gen.py
