#!/usr/bin/env bash
# Makes a development CA, a broker certificate (SAN localhost, 127.0.0.1) and a client
# certificate whose key is encrypted with a passphrase, so the local stack exercises every SSL
# setting a managed Kafka needs. Also a "rogue" CA with the same subject name and a client
# certificate from it, for tests that prove the broker refuses foreign certificates.
#
# Usage: certs/make-dev-certs.sh [OUTDIR]      (default: certs/dev; files there are git-ignored)
# Existing files are kept; delete OUTDIR to start over.
set -euo pipefail

out=${1:-"$(cd "$(dirname "$0")" && pwd)/dev"}
days=${CERT_DAYS:-825}
mkdir -p "$out" "$out/rogue"
cd "$out"

if [ -s ca.pem ] && [ -s client.pem ] && [ -s broker.pem ] && [ -s client.pass ] && [ -s rogue/client.pem ]; then
  echo "certificates already in $out"
  exit 0
fi

umask 077
subj_ca="/CN=periodic-checker development CA"

make_ca() { # dir
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
    -keyout "$1/ca.key" -out "$1/ca.pem" -days "$days" -subj "$subj_ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
}

sign() { # dir name ext-file
  openssl x509 -req -in "$1/$2.csr" -CA "$1/ca.pem" -CAkey "$1/ca.key" -CAcreateserial \
    -out "$1/$2.pem" -days "$days" -sha256 -extfile "$3" 2>/dev/null
  rm -f "$1/$2.csr"
}

make_ca .
make_ca rogue

cat > broker.ext <<'EXT'
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1
EXT
cat > client.ext <<'EXT'
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
EXT

# Broker: plain key (stunnel reads it at start).
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout broker.key \
  -out broker.csr -subj "/CN=localhost" 2>/dev/null
sign . broker broker.ext

# Client: key encrypted with a random passphrase, written beside it for the local .env.prod.
openssl rand -hex 16 > client.pass
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:prime256v1 -aes-256-cbc \
  -pass file:client.pass -out client.key 2>/dev/null
openssl req -new -key client.key -passin file:client.pass -out client.csr \
  -subj "/CN=periodic-checker client" 2>/dev/null
sign . client client.ext

# Rogue client: same CA subject, different key: the broker must refuse it.
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout rogue/client.key \
  -out rogue/client.csr -subj "/CN=rogue client" 2>/dev/null
sign rogue client client.ext

rm -f broker.ext client.ext ./*.srl rogue/*.srl
chmod 600 ./*.key rogue/*.key client.pass
chmod 644 ./*.pem rogue/*.pem
echo "certificates written to $out"
