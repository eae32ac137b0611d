// Drives a node agent's Workload API with Node's @grpc/grpc-js (default options) and
// @grpc/proto-loader over proto/workload.proto. Run by tests/tests/interop_clients.rs:
//   node workload_api.js SOCKET PROTO AUDIENCE
// Prints one JSON object with what the client saw; any error exits non-zero.
'use strict';

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [socket, protoPath, audience] = process.argv.slice(2);
const def = protoLoader.loadSync(protoPath, { keepCase: true, longs: String, defaults: true });
const api = grpc.loadPackageDefinition(def).SpiffeWorkloadAPI;
const client = new api(socket, grpc.credentials.createInsecure());
const md = () => {
  const m = new grpc.Metadata();
  m.set('workload.spiffe.io', 'true');
  return m;
};
const deadline = () => Date.now() + 20000;

function firstX509() {
  return new Promise((resolve, reject) => {
    const call = client.FetchX509SVID({}, md(), { deadline: deadline() });
    call.once('data', (msg) => {
      call.cancel();
      resolve(msg);
    });
    call.once('error', (e) => {
      if (e.code !== grpc.status.CANCELLED) reject(e);
    });
  });
}

function unary(method, req, metadata) {
  return new Promise((resolve, reject) => {
    client[method](req, metadata, { deadline: deadline() }, (err, res) =>
      err ? reject(err) : resolve(res));
  });
}

async function main() {
  const x509 = await firstX509();
  const jwt = await unary('FetchJWTSVID', { audience: [audience] }, md());
  const token = jwt.svids[0].svid;
  const validated = await unary('ValidateJWTSVID', { audience, svid: token }, md());
  let otherAudience = null;
  try {
    await unary('ValidateJWTSVID', { audience: audience + '-other', svid: token }, md());
  } catch (e) {
    otherAudience = grpc.status[e.code];
  }
  let noHeader = null;
  try {
    await unary('FetchJWTSVID', { audience: [audience] }, new grpc.Metadata());
  } catch (e) {
    noHeader = grpc.status[e.code];
  }
  const claims = validated.claims && validated.claims.fields;
  console.log(JSON.stringify({
    x509_ids: x509.svids.map((s) => s.spiffe_id),
    x509_cert_bytes: x509.svids[0].x509_svid.length,
    x509_key_bytes: x509.svids[0].x509_svid_key.length,
    x509_bundle_bytes: x509.svids[0].bundle.length,
    jwt_ids: jwt.svids.map((s) => s.spiffe_id),
    validated_id: validated.spiffe_id,
    validated_sub: claims && claims.sub && claims.sub.stringValue,
    other_audience: otherAudience,
    no_header: noHeader,
  }));
  client.close();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
