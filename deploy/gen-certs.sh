#!/bin/sh
# Self-signed CA + server and client certificates for splitinfer's TLS / mutual TLS (OpenSSL >= 1.1.1).
#
#   deploy/gen-certs.sh [OUT_DIR] [CLIENT ...]        (default: deploy/certs, one client named "edge")
#   SERVER_SANS=DNS:gpu1.example.org,IP:10.0.0.5 deploy/gen-certs.sh   # extra names the server is reached by
#
# Writes ca.crt/ca.key, server.crt/server.key and <client>.crt/<client>.key. The server certificate names
# localhost/127.0.0.1 (health checks), `server` and `relay` (compose) and
# splitinfer-server[.splitinfer.svc.cluster.local] (Kubernetes), and carries serverAuth *and* clientAuth so that
# health checks can present it under mutual TLS. An existing CA (ca.key) is reused.
# Keep ca.key offline; deploy/certs is ignored by git and docker.
set -eu
out=${1:-deploy/certs}
[ $# -gt 0 ] && shift
clients=${*:-edge}
days=${DAYS:-825}
sans="DNS:localhost,IP:127.0.0.1,DNS:server,DNS:relay,DNS:splitinfer-server,DNS:splitinfer-server.splitinfer.svc"
sans="$sans,DNS:splitinfer-server.splitinfer.svc.cluster.local${SERVER_SANS:+,$SERVER_SANS}"
mkdir -p "$out"
cd "$out"
umask 077

newkey() {  # newkey NAME SUBJECT: EC P-256 key + certificate request
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1.key" -out "$1.csr" \
        -subj "$2" 2>/dev/null
}
sign() {  # sign NAME EXTENSIONS...: certificate signed by the CA
    name=$1
    shift
    printf '%s\n' "$@" > "$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" -sha256 \
        -extfile "$name.ext" -out "$name.crt" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
}

if [ ! -f ca.key ]; then
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt \
        -days 3650 -sha256 -subj "/CN=splitinfer-ca" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
newkey server "/CN=splitinfer-server"
sign server "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=$sans"
for c in $clients; do
    newkey "$c" "/CN=$c"
    sign "$c" "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature" "extendedKeyUsage=clientAuth"
done
chmod 644 ./*.crt
chmod 600 ./*.key
echo "wrote $(pwd): ca.crt server.crt/.key $(for c in $clients; do printf '%s.crt/.key ' "$c"; done)"
