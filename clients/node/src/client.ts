/**
 * A typed client for every iam.v1 service, over gRPC (HTTP/2) with
 * @connectrpc/connect-node. The services come from the generated index, so
 * a service added to protos/ appears here after `make proto`.
 */
import type * as http2 from "node:http2";

import { createClient, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

import { services } from "./gen/index.js";

/** Every generated iam.v1 service descriptor, by its proto name. */
export type IamServices = typeof services;

/** "AuthService" -> "auth", "ApiTokenService" -> "apiToken". */
type ClientKey<Name extends string> = Name extends `${infer Stem}Service` ? Uncapitalize<Stem> : Uncapitalize<Name>;

/** One typed client per service: `iam.auth.signup(...)`, `iam.token.refresh(...)`, `iam.mfa.verifyChallenge(...)`. */
export type IamServiceClients = {
  [Name in keyof IamServices & string as ClientKey<Name>]: Client<IamServices[Name]>;
};

export interface IamClientOptions {
  /**
   * Where iam-grpc listens: "host:port" (plaintext unless `tls` is set),
   * "http://host:port" (plaintext) or "https://host:port" (TLS).
   */
  address: string;
  /** Your service's API key, sent as `x-iam-api-key` on every call. */
  apiKey?: string;
  /**
   * TLS: true for the system's CAs, or Node's http2 options for a private
   * CA and a client certificate (`{ca, cert, key}`: mTLS callers).
   */
  tls?: boolean | http2.SecureClientSessionOptions;
  /** Deadline of every call in milliseconds unless the call sets `timeoutMs` (default 5000). */
  timeoutMs?: number;
  /**
   * Makes the `x-request-id` of each call (8-128 of `A-Za-z0-9._:-`) so your
   * logs and iam-grpc's correlate; unset: the server makes one. A call's own
   * `headers: {"x-request-id": ...}` wins.
   */
  requestId?: () => string;
  /** More interceptors, run after the package's own. */
  interceptors?: Interceptor[];
}

export type IamClient = IamServiceClients & {
  /** The transport the service clients share (for `createClient` of your own). */
  readonly transport: Transport;
  /** Close the HTTP/2 connection; calls made afterwards open a new one. */
  close(): void;
};

function baseUrl(address: string, tls: IamClientOptions["tls"]): string {
  if (/^https?:\/\//.test(address)) {
    if (tls && address.startsWith("http://")) throw new Error("tls is set but the address says http://");
    return address;
  }
  return `${tls ? "https" : "http"}://${address}`;
}

function clientKey(name: string): string {
  const stem = name.endsWith("Service") ? name.slice(0, -"Service".length) : name;
  return stem.charAt(0).toLowerCase() + stem.slice(1);
}

/** Create one client (one HTTP/2 connection) for all iam.v1 services. */
export function createIamClient(options: IamClientOptions): IamClient {
  const url = baseUrl(options.address, options.tls);
  const nodeOptions = typeof options.tls === "object" ? options.tls : {};
  const sessions = new Http2SessionManager(url, { pingIntervalMs: 60_000 }, nodeOptions);
  const callerHeaders: Interceptor = (next) => async (request) => {
    if (options.apiKey && !request.header.has("x-iam-api-key")) {
      request.header.set("x-iam-api-key", options.apiKey);
    }
    if (options.requestId && !request.header.has("x-request-id")) {
      request.header.set("x-request-id", options.requestId());
    }
    return next(request);
  };
  const transport = createGrpcTransport({
    baseUrl: url,
    sessionManager: sessions,
    defaultTimeoutMs: options.timeoutMs ?? 5000,
    interceptors: [callerHeaders, ...(options.interceptors ?? [])],
  });
  const clients: Record<string, unknown> = {};
  for (const [name, service] of Object.entries(services)) {
    clients[clientKey(name)] = createClient(service, transport);
  }
  return Object.assign(clients as IamServiceClients, {
    transport,
    close: () => sessions.abort(),
  });
}
