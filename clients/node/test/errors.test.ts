import assert from "node:assert/strict";
import { after, test } from "node:test";

import { Code, ConnectError } from "@connectrpc/connect";

import { decodeError, decodeStatusDetails, IamError } from "../src/index.js";
import { connect, freshIp, LOGOUT_LIMIT, signUp } from "./server.js";

const iam = connect();
after(() => iam.close());

/** Run a call that must fail; answer what it threw. */
async function failure(call: Promise<unknown>): Promise<unknown> {
  try {
    await call;
  } catch (error) {
    return error;
  }
  assert.fail("the call succeeded");
}

test("INVALID_ARGUMENT comes with every invalid field at once", async () => {
  const thrown = await failure(
    iam.auth.signup({ client: { ip: freshIp() }, email: "no-at-sign", password: "short", name: "", termsAccepted: false }),
  );
  const error = decodeError(thrown);
  assert.ok(error instanceof IamError);
  assert.equal(error.code, "INVALID_ARGUMENT");
  assert.equal(error.status, 3);
  assert.equal(error.reason, "INVALID_ARGUMENT");
  assert.equal(error.domain, "iam.v1");
  assert.equal(error.retryDelay, undefined);
  assert.deepEqual(error.fieldViolations.map((v) => v.field).sort(), ["email", "name", "password", "terms_accepted"]);
  for (const violation of error.fieldViolations) assert.ok(violation.description.length > 0);
  assert.equal(error.cause, thrown);
});

test("a wrong password is INVALID_CREDENTIALS, and says nothing about the account", async () => {
  const account = await signUp(iam);
  const ip = freshIp();
  const wrong = decodeError(await failure(iam.auth.login({ client: { ip }, email: account.email, password: "not the password at all" })));
  const unknown = decodeError(
    await failure(iam.auth.login({ client: { ip: freshIp() }, email: `nobody.${Date.now()}@example.com`, password: "not the password at all" })),
  );
  for (const error of [wrong, unknown]) {
    assert.deepEqual([error.code, error.reason, error.domain], ["UNAUTHENTICATED", "INVALID_CREDENTIALS", "iam.v1"]);
    assert.deepEqual(error.fieldViolations, []);
  }
  assert.equal(wrong.message, unknown.message);
  assert.deepEqual(wrong.metadata, unknown.metadata);
});

test("RATE_LIMITED carries RetryInfo and the limit's scope", async () => {
  const ip = freshIp();
  const refreshToken = "iamr_" + "u".repeat(43);
  for (let i = 0; i < LOGOUT_LIMIT; i++) {
    await iam.auth.logout({ client: { ip }, refreshToken }); // unknown tokens answer OK: Logout is idempotent
  }
  const thrown = await failure(iam.auth.logout({ client: { ip }, refreshToken }));
  const error = decodeError(thrown);
  assert.deepEqual([error.code, error.reason, error.domain], ["RESOURCE_EXHAUSTED", "RATE_LIMITED", "iam.v1"]);
  // Until the 1 h window frees a point, in whole seconds; the sliding estimate can take a
  // fraction of a window more than the window itself.
  const delay = error.retryDelay;
  assert.ok(delay !== undefined && delay >= 1000 && delay <= 2 * 3_600_000 && delay % 1000 === 0, `retryDelay ${delay}`);
  assert.ok((error.metadata.scope ?? "").length > 0, JSON.stringify(error.metadata));
  // Another IP is not limited.
  await iam.auth.logout({ client: { ip: freshIp() }, refreshToken });
});

test("the raw trailer decodes the same way, for @grpc/grpc-js users", async () => {
  const thrown = await failure(iam.auth.signup({ client: { ip: freshIp() }, email: "", password: "", name: "", termsAccepted: true }));
  assert.ok(thrown instanceof ConnectError);
  const trailer = thrown.metadata.get("grpc-status-details-bin");
  assert.ok(trailer, "the server sent no grpc-status-details-bin");
  const bytes = Buffer.from(trailer, "base64");
  const direct = decodeStatusDetails(bytes);
  // A grpc-js ServiceError: numeric code, `details` text, Metadata whose get() answers Buffers.
  const serviceError = Object.assign(new Error("3 INVALID_ARGUMENT: ..."), {
    code: 3,
    details: thrown.rawMessage,
    metadata: { get: (key: string) => (key === "grpc-status-details-bin" ? [bytes] : []) },
  });
  const fromGrpcJs = decodeError(serviceError);
  const fromConnect = decodeError(thrown);
  for (const error of [direct, fromGrpcJs]) {
    assert.equal(error.code, fromConnect.code);
    assert.equal(error.reason, "INVALID_ARGUMENT");
    assert.equal(error.message, fromConnect.message);
    assert.deepEqual(error.fieldViolations, fromConnect.fieldViolations);
  }
  assert.deepEqual(fromConnect.fieldViolations.map((v) => v.field).sort(), ["email", "name", "password"]);
});

test("errors that are not iam-grpc's still decode, without a reason", () => {
  const timeout = decodeError(new ConnectError("deadline passed", Code.DeadlineExceeded));
  assert.deepEqual([timeout.code, timeout.reason, timeout.domain], ["DEADLINE_EXCEEDED", "", ""]);
  const bug = decodeError(new TypeError("x is undefined"));
  assert.deepEqual([bug.code, bug.status, bug.message], ["UNKNOWN", 2, "x is undefined"]);
  const grpcJsWithoutDetails = decodeError({ code: 14, details: "connection refused", metadata: { get: () => [] } });
  assert.deepEqual([grpcJsWithoutDetails.code, grpcJsWithoutDetails.message], ["UNAVAILABLE", "connection refused"]);
  const garbage = decodeError({ code: 13, details: "boom", metadata: { get: () => [new Uint8Array([0xff, 0xff, 0xff])] } });
  assert.deepEqual([garbage.code, garbage.reason], ["INTERNAL", ""]);
});
