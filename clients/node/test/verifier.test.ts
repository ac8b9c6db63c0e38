import assert from "node:assert/strict";
import { after, test } from "node:test";

import { decodeError, IamError, TokenVerifier, type JSONWebKeySet } from "../src/index.js";
import { ALGORITHM, connect, OPS_ADDRESS, signUp } from "./server.js";

const iam = connect();
after(() => iam.close());

const JWKS_URL = `http://${OPS_ADDRESS}/.well-known/jwks.json`;

async function refusal(call: Promise<unknown>): Promise<IamError> {
  try {
    await call;
  } catch (error) {
    assert.ok(error instanceof IamError, `not an IamError: ${String(error)}`);
    return error;
  }
  assert.fail("the token was accepted");
}

function part(token: string, index: number): Record<string, unknown> {
  return JSON.parse(Buffer.from(token.split(".")[index]!, "base64url").toString()) as Record<string, unknown>;
}

function withPart(token: string, index: number, value: Record<string, unknown>): string {
  const parts = token.split(".");
  parts[index] = Buffer.from(JSON.stringify(value)).toString("base64url");
  return parts.join(".");
}

test("a real token verifies locally, with keys from the ops JWKS, from GetJwks or given", async () => {
  const { session } = await signUp(iam);
  const fetched = await (await fetch(JWKS_URL)).json();
  const verifiers = [
    new TokenVerifier({ jwks: JWKS_URL }),
    new TokenVerifier({ client: iam }),
    new TokenVerifier({ jwks: fetched as JSONWebKeySet }),
    new TokenVerifier({ jwks: JSON.stringify(fetched) }),
  ];
  assert.equal(part(session.accessToken, 0).alg, ALGORITHM);
  for (const verifier of verifiers) {
    const principal = await verifier.verify(session.accessToken, { requiredRoles: ["user"] });
    assert.equal(principal.userId, session.userId);
    assert.equal(principal.sessionId, session.sessionId);
    assert.equal(principal.deviceId, session.deviceId);
    assert.deepEqual(principal.roles, ["user"]);
    assert.equal(principal.expiresAt.getTime(), Number(session.accessExpiresAt!.seconds) * 1000);
    assert.ok(principal.authTime <= new Date());
    assert.equal(principal.claims.iss, "iam-grpc");
  }
  const missing = await refusal(verifiers[0]!.verify(session.accessToken, { requiredRoles: ["admin", "support"] }));
  assert.deepEqual([missing.code, missing.reason, missing.metadata.missing], ["PERMISSION_DENIED", "ROLE_REQUIRED", "admin,support"]);
});

test("tampered tokens are TOKEN_INVALID", async () => {
  const { session } = await signUp(iam);
  const verifier = new TokenVerifier({ jwks: JWKS_URL });
  const token = session.accessToken;
  const claims = part(token, 1);
  const header = part(token, 0);
  const [h, p, s] = token.split(".") as [string, string, string];
  const flipped = s.slice(0, 10) + (s[10] === "A" ? "B" : "A") + s.slice(11);
  const tampered = [
    withPart(token, 1, { ...claims, roles: ["user", "admin"] }), // more roles, same signature
    withPart(token, 1, { ...claims, sub: "01HZZZZZZZZZZZZZZZZZZZZZZZ" }),
    `${h}.${p}.${flipped}`,
    `${h}.${p}.`,
    withPart(token, 0, { ...header, alg: "none" }).split(".").slice(0, 2).join(".") + ".",
    withPart(token, 0, { ...header, alg: "HS256" }),
    withPart(token, 0, { ...header, typ: "JWT" }),
    withPart(token, 0, { ...header, kid: "someone-elses-key" }),
    withPart(token, 0, { ...header, jku: `http://${OPS_ADDRESS}/evil.json` }),
    "",
    "not a token",
    `${token}.${s}`,
    token + "A".repeat(5000),
  ];
  for (const candidate of tampered) {
    const error = await refusal(verifier.verify(candidate));
    assert.deepEqual([error.code, error.reason], ["UNAUTHENTICATED", "TOKEN_INVALID"], candidate.slice(0, 80));
  }
  // The server agrees about each of the signed ones.
  for (const candidate of tampered.slice(0, 3)) {
    const error = decodeError(await iam.token.verifyAccessToken({ accessToken: candidate }).then(() => undefined, (e: unknown) => e));
    assert.equal(error.reason, "TOKEN_INVALID");
  }
});

test("a token for another issuer, audience or algorithm is refused", async () => {
  const { session } = await signUp(iam);
  const other: typeof ALGORITHM = ALGORITHM === "ES256" ? "EdDSA" : "ES256";
  for (const verifier of [
    new TokenVerifier({ jwks: JWKS_URL, issuer: "https://other.example" }),
    new TokenVerifier({ jwks: JWKS_URL, audience: "another-service" }),
    new TokenVerifier({ jwks: JWKS_URL, algorithms: [other] }),
  ]) {
    const error = await refusal(verifier.verify(session.accessToken));
    assert.equal(error.reason, "TOKEN_INVALID");
  }
});

test("an expired token is TOKEN_EXPIRED, after the leeway, and only when its signature holds", async () => {
  const { session } = await signUp(iam);
  const expiresAt = Number(session.accessExpiresAt!.seconds) * 1000;
  const at = (ms: number) => new TokenVerifier({ jwks: JWKS_URL, now: () => new Date(ms), leewaySeconds: 30 });
  await at(expiresAt + 29_000).verify(session.accessToken); // within the leeway
  const expired = await refusal(at(expiresAt + 31_000).verify(session.accessToken));
  assert.deepEqual([expired.code, expired.reason], ["UNAUTHENTICATED", "TOKEN_EXPIRED"]);
  // A forged token never learns that it would be expired.
  const forged = withPart(session.accessToken, 1, { ...part(session.accessToken, 1), roles: ["admin"] });
  assert.equal((await refusal(at(expiresAt + 31_000).verify(forged))).reason, "TOKEN_INVALID");
  // Issued in the future (beyond the leeway) is invalid.
  const issuedAt = Number(part(session.accessToken, 1).iat) * 1000;
  assert.equal((await refusal(at(issuedAt - 60_000).verify(session.accessToken))).reason, "TOKEN_INVALID");
});

test("a revoked token passes locally, and is refused when the deny-list is asked", async () => {
  const account = await signUp(iam);
  const { session } = account;
  const local = new TokenVerifier({ jwks: JWKS_URL, client: iam });
  const checked = new TokenVerifier({ jwks: JWKS_URL, client: iam, checkRevocation: true });
  assert.equal((await checked.verify(session.accessToken)).sessionId, session.sessionId);

  await iam.auth.logout({ client: { ip: account.ip, deviceId: session.deviceId }, refreshToken: session.refreshToken });

  // Signature and claims still hold: local verification cannot know (until the token expires).
  assert.equal((await local.verify(session.accessToken)).sessionId, session.sessionId);
  const calls = [() => checked.verify(session.accessToken), () => local.verify(session.accessToken, { checkRevocation: true })];
  for (const call of calls) {
    const error = await refusal(call());
    assert.deepEqual([error.code, error.reason, error.domain], ["UNAUTHENTICATED", "SESSION_REVOKED", "iam.v1"]);
  }
  assert.throws(() => new TokenVerifier({ jwks: JWKS_URL, checkRevocation: true }), /needs `client`/);
});

test("an unreachable key source is BACKEND_UNAVAILABLE, not a verdict on the token", async () => {
  const { session } = await signUp(iam);
  const nowhere = new TokenVerifier({ jwks: "http://127.0.0.1:9/.well-known/jwks.json" });
  const error = await refusal(nowhere.verify(session.accessToken));
  assert.deepEqual([error.code, error.reason], ["UNAVAILABLE", "BACKEND_UNAVAILABLE"]);
});
