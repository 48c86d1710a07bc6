#!/bin/sh
# Makes the TLS material the tests use, in qemu's layouts, under DIR:
#   DIR/server/  ca-cert.pem server-cert.pem server-key.pem  (tls-creds-x509 endpoint=server)
#   DIR/client/  ca-cert.pem client-cert.pem client-key.pem  (endpoint=client; nbdinfo tls-certificates=)
#   DIR/rogue/   the same client files, signed by another CA
#   DIR/psk/keys.psk          alice's key, in qemu's username:hexkey form
#   DIR/psk-wrong/keys.psk    alice with another key
# The client certificate's distinguished name is
#   CN=client.tidemark.test,O=Tidemark Tests,C=GB
# Usage: gen-certs.sh DIR
set -eu
dir=$1
mkdir -p "$dir/server" "$dir/client" "$dir/rogue" "$dir/psk" "$dir/psk-wrong" "$dir/work"
w=$dir/work
q() { openssl "$@" 2>/dev/null; }

ca() { # name subject
    q req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout "$w/$1-key.pem" -out "$w/$1-cert.pem" \
        -subj "$2" -addext basicConstraints=critical,CA:TRUE \
        -addext keyUsage=critical,keyCertSign,cRLSign
}

leaf() { # ca name subject usage [san]
    q req -newkey rsa:2048 -nodes -keyout "$w/$2-key.pem" -out "$w/$2.csr" -subj "$3"
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=$4"
        if [ -n "${5:-}" ]; then echo "subjectAltName=$5"; fi
    } >"$w/$2.ext"
    q x509 -req -in "$w/$2.csr" -CA "$w/$1-cert.pem" -CAkey "$w/$1-key.pem" -CAcreateserial \
        -days 3650 -extfile "$w/$2.ext" -out "$w/$2-cert.pem"
}

ca ca "/CN=Tidemark Test CA/O=Tidemark Tests"
ca rogueca "/CN=Rogue CA/O=Elsewhere"
leaf ca server "/C=GB/O=Tidemark Tests/CN=localhost" serverAuth "IP:127.0.0.1,IP:::1,DNS:localhost"
leaf ca client "/C=GB/O=Tidemark Tests/CN=client.tidemark.test" clientAuth
leaf rogueca rogue "/C=GB/O=Tidemark Tests/CN=client.tidemark.test" clientAuth

cp "$w/ca-cert.pem" "$dir/server/ca-cert.pem"
cp "$w/server-cert.pem" "$dir/server/server-cert.pem"
cp "$w/server-key.pem" "$dir/server/server-key.pem"
cp "$w/ca-cert.pem" "$dir/client/ca-cert.pem"
cp "$w/client-cert.pem" "$dir/client/client-cert.pem"
cp "$w/client-key.pem" "$dir/client/client-key.pem"
cp "$w/ca-cert.pem" "$dir/rogue/ca-cert.pem"
cp "$w/rogue-cert.pem" "$dir/rogue/client-cert.pem"
cp "$w/rogue-key.pem" "$dir/rogue/client-key.pem"
echo "alice:5c1e8f0b9a7d3c2e4f6a8b0c1d2e3f405162738495a6b7c8d9e0f1a2b3c4d5e6" >"$dir/psk/keys.psk"
echo "alice:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff" >"$dir/psk-wrong/keys.psk"
chmod 600 "$dir"/*/*-key.pem "$dir"/psk*/keys.psk
rm -rf "$w"
