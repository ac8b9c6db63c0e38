import assert from "node:assert/strict";
import { after, test } from "node:test";

import { ConnectError } from "@connectrpc/connect";

import { createIamClient, decodeError, services, timestampDate } from "../src/index.js";
import { API_KEY, connect, GRPC_ADDRESS, signUp } from "./server.js";

const iam = connect();
after(() => iam.close());

test("signup, login, refresh and verify through the typed client", async () => {
  const account = await signUp(iam);
  const client = { ip: account.ip, userAgent: account.userAgent, deviceId: account.session.deviceId };
  assert.match(account.session.accessToken, /^[\w-]+\.[\w-]+\.[\w-]+$/);
  assert.match(account.session.refreshToken, /^iamr_/);
  assert.match(account.session.deviceId, /^dev_/);
  assert.ok(timestampDate(account.session.accessExpiresAt!) > new Date());

  // The device the signup issued is trusted: the login answers a session, not a challenge.
  const login = await iam.auth.login({ client, email: account.email.toUpperCase(), password: account.password });
  assert.equal(login.result.case, "session");
  const session = login.result.value;
  assert.equal(session.userId, account.session.userId);
  assert.notEqual(session.sessionId, account.session.sessionId);

  const refreshed = await iam.token.refresh({ client, refreshToken: session.refreshToken });
  assert.equal(refreshed.result.case, "session");
  const rotated = refreshed.result.value;
  assert.equal(rotated.sessionId, session.sessionId);
  assert.notEqual(rotated.refreshToken, session.refreshToken);
  assert.notEqual(rotated.accessToken, session.accessToken);

  const verified = await iam.token.verifyAccessToken({ accessToken: rotated.accessToken, requiredRoles: ["user"] });
  assert.equal(verified.userId, account.session.userId);
  assert.equal(verified.sessionId, session.sessionId);
  assert.equal(verified.deviceId, account.session.deviceId);
  assert.deepEqual(verified.roles, ["user"]);
  assert.ok(timestampDate(verified.expiresAt!) > new Date());

  const listed = await iam.token.listSessions({ accessToken: rotated.accessToken });
  assert.deepEqual(
    listed.sessions.map((s) => s.sessionId).sort(),
    [account.session.sessionId, session.sessionId].sort(),
  );
  assert.equal(listed.sessions.find((s) => s.current)?.sessionId, session.sessionId);

  // Logout ends the session: its refresh token stops working.
  await iam.auth.logout({ client, refreshToken: rotated.refreshToken });
  await assert.rejects(iam.token.refresh({ client, refreshToken: rotated.refreshToken }), (error) => {
    const decoded = decodeError(error);
    assert.deepEqual([decoded.code, decoded.reason], ["UNAUTHENTICATED", "SESSION_REVOKED"]);
    return true;
  });
});

test("every generated service has a client, named after it", () => {
  assert.deepEqual(Object.keys(services).sort(), [
    "ApiTokenService",
    "AuthService",
    "EventService",
    "MfaService",
    "TokenService",
    "UserService",
  ]);
  for (const [name, service] of Object.entries(services)) {
    const key = name.charAt(0).toLowerCase() + name.slice(1, -"Service".length);
    const client = (iam as unknown as Record<string, Record<string, unknown>>)[key];
    assert.ok(client, `no client for ${name}`);
    for (const method of service.methods) assert.equal(typeof client[method.localName], "function");
  }
});

test("the API key identifies the caller; the request id reaches the server and comes back", async () => {
  let echoed: string | null = null;
  const withKey = createIamClient({
    address: `http://${GRPC_ADDRESS}`,
    apiKey: API_KEY,
    requestId: () => "node-test-request-0001",
    interceptors: [
      (next) => async (request) => {
        const response = await next(request);
        echoed = response.header.get("x-request-id");
        return response;
      },
    ],
  });
  const unknownKey = createIamClient({ address: GRPC_ADDRESS, apiKey: "iamk_not_a_configured_key_0000000000" });
  try {
    // The key's caller may call GetJwks and VerifyAccessToken only (tests/e2e/test_node_client.py).
    const jwks = JSON.parse((await withKey.token.getJwks({})).jwksJson) as { keys: { kid: string }[] };
    assert.ok(jwks.keys.length >= 1);
    assert.equal(echoed, "node-test-request-0001");
    await assert.rejects(withKey.auth.logout({ client: { ip: "198.18.0.1" } }), (error) => {
      const decoded = decodeError(error);
      assert.deepEqual([decoded.code, decoded.reason, decoded.domain], ["PERMISSION_DENIED", "CALLER_UNKNOWN", "iam.v1"]);
      assert.ok(error instanceof ConnectError);
      assert.match(error.metadata.get("x-request-id") ?? "", /^node-test-request-0001/);
      return true;
    });
    // A key the server does not know is refused, even from loopback where no key is needed.
    await assert.rejects(unknownKey.token.getJwks({}), (error) => {
      const decoded = decodeError(error);
      assert.deepEqual([decoded.code, decoded.reason], ["UNAUTHENTICATED", "CALLER_UNKNOWN"]);
      return true;
    });
  } finally {
    withKey.close();
    unknownKey.close();
  }
});
