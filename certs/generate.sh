#!/usr/bin/env bash
# Creates a development CA, a server certificate for localhost / 127.0.0.1 signed by it, and a
# client certificate (common name given as $1, default "device-1") in the directory $2 (default:
# this directory). For development and tests only: the keys are written unencrypted, and no
# private key is ever committed (.gitignore keeps *.key, *.pem out).
#
#   bash certs/generate.sh                 # certs/ca.pem, server.pem, server.key, client.pem, client.key
#   bash certs/generate.sh editor /tmp/x   # client common name "editor", files in /tmp/x
set -euo pipefail
CN=${1:-device-1}
DIR=${2:-$(dirname "$0")}
mkdir -p "$DIR"
cd "$DIR"
days=825
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days $days \
  -subj "/CN=Herald development CA" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
printf "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n" > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days $days \
  -extfile server.ext 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj "/CN=$CN" 2>/dev/null
printf "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n" > client.ext
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days $days \
  -extfile client.ext 2>/dev/null
rm -f server.csr client.csr server.ext client.ext ca.srl
echo "wrote $DIR/{ca.pem,ca.key,server.pem,server.key,client.pem,client.key} (client CN=$CN)"
