/**
 * @iam-grpc/client: call iam-grpc from Node.js.
 *
 * - `createIamClient` — typed clients for every iam.v1 service (gRPC over HTTP/2).
 * - `decodeError` — a failed call as {code, reason, domain, metadata, fieldViolations, retryDelay}.
 * - `TokenVerifier` — access tokens verified locally against the JWKS, optionally deny-list aware.
 * - every generated message type and schema of protos/ (iam.v1, google.rpc).
 */
export * from "./gen/index.js";
export { createIamClient, type IamClient, type IamClientOptions, type IamServiceClients, type IamServices } from "./client.js";
export {
  decodeError,
  decodeStatusDetails,
  GRPC_CODES,
  IAM_ERROR_DOMAIN,
  IamError,
  type FieldViolation,
  type GrpcCode,
} from "./errors.js";
export {
  TokenVerifier,
  type Principal,
  type SigningAlgorithm,
  type TokenVerifierOptions,
  type VerifyOptions,
} from "./verifier.js";
export { create, fromBinary, toBinary, toJson, fromJson } from "@bufbuild/protobuf";
export { timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
export type { JSONWebKeySet } from "jose";
