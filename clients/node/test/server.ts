/**
 * The real iam-grpc server these tests talk to. tests/e2e/test_node_client.py
 * starts it (embedded mode, free ports) and runs `npm test` with its
 * addresses in the environment; without them every test fails.
 */
import { randomBytes, randomInt } from "node:crypto";

import { createIamClient, type IamClient, type Session } from "../src/index.js";

function required(name: string): string {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: run these tests through tests/e2e/test_node_client.py (it starts the server)`);
  }
  return value;
}

/** host:port of the gRPC listener. */
export const GRPC_ADDRESS = required("IAM_TEST_GRPC_ADDRESS");
/** host:port of the ops HTTP listener (JWKS). */
export const OPS_ADDRESS = required("IAM_TEST_OPS_ADDRESS");
/** The algorithm the server signs with (tokens.algorithm). */
export const ALGORITHM = required("IAM_TEST_ALGORITHM") as "ES256" | "EdDSA";
/** An API key whose caller may call only TokenService.GetJwks and VerifyAccessToken. */
export const API_KEY = required("IAM_TEST_API_KEY");
/** Logouts one IP may make before RATE_LIMITED (the server's ratelimit.groups."logout.ip"). */
export const LOGOUT_LIMIT = Number(required("IAM_TEST_LOGOUT_LIMIT"));

export function connect(): IamClient {
  return createIamClient({ address: GRPC_ADDRESS, timeoutMs: 10_000, requestId: () => `node-test-${randomBytes(6).toString("hex")}` });
}

/** A fresh end-user IP (rate limits are per IP), in 198.18.0.0/15. */
export function freshIp(): string {
  return `198.${18 + randomInt(2)}.${randomInt(256)}.${randomInt(1, 255)}`;
}

export interface Account {
  email: string;
  password: string;
  ip: string;
  userAgent: string;
  session: Session;
}

/** Sign a new user up; the session is bound to the device the server issued. */
export async function signUp(iam: IamClient): Promise<Account> {
  const email = `node.${randomBytes(6).toString("hex")}@example.com`;
  const password = `correct horse battery staple ${randomBytes(4).toString("hex")}`;
  const ip = freshIp();
  const userAgent = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0";
  const answer = await iam.auth.signup({ client: { ip, userAgent }, email, password, name: "Ada", lastName: "Lovelace", termsAccepted: true });
  if (answer.session === undefined) throw new Error("Signup answered no session");
  return { email, password, ip, userAgent, session: answer.session };
}
