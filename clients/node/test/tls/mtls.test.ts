/**
 * TLS and mTLS options against a server that requires client certificates.
 * Run by tests/e2e/test_node_client.py::test_node_client_over_mtls, which
 * makes the CA and certificates (trustme) and starts the server; not part of
 * the plaintext run (`npm test` leaves test/tls/ out).
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { createIamClient, decodeError } from "../../src/index.js";

function required(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run through tests/e2e/test_node_client.py`);
  return value;
}

const ADDRESS = required("IAM_TEST_TLS_ADDRESS");
const ca = readFileSync(required("IAM_TEST_TLS_CA"));
const cert = readFileSync(required("IAM_TEST_TLS_CERT"));
const key = readFileSync(required("IAM_TEST_TLS_KEY"));

test("a client certificate identifies the caller over mTLS", async () => {
  for (const address of [ADDRESS, `https://${ADDRESS}`]) {
    const iam = createIamClient({ address, tls: { ca, cert, key } });
    try {
      // The certificate's caller may call GetJwks only.
      const jwks = JSON.parse((await iam.token.getJwks({})).jwksJson) as { keys: unknown[] };
      assert.ok(jwks.keys.length >= 1);
      await assert.rejects(iam.auth.logout({ client: { ip: "198.18.0.2" } }), (error) => {
        const decoded = decodeError(error);
        assert.deepEqual([decoded.code, decoded.reason], ["PERMISSION_DENIED", "CALLER_UNKNOWN"]);
        return true;
      });
    } finally {
      iam.close();
    }
  }
});

test("without a client certificate, or without trusting the server's CA, nothing is called", async () => {
  const attempts = [
    createIamClient({ address: ADDRESS, tls: { ca } }), // the server wants a client certificate
    createIamClient({ address: ADDRESS, tls: { cert, key } }), // the server's CA is not trusted
    createIamClient({ address: ADDRESS }), // plaintext to a TLS port
  ];
  for (const iam of attempts) {
    try {
      await assert.rejects(iam.token.getJwks({}, { timeoutMs: 3000 }), (error) => {
        const decoded = decodeError(error);
        assert.notEqual(decoded.code, "OK");
        assert.equal(decoded.reason, ""); // no answer of the server's
        return true;
      });
    } finally {
      iam.close();
    }
  }
});
