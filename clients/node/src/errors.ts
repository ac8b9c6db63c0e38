/**
 * One error model for every failure a caller sees: the gRPC status and the
 * `google.rpc.Status` details iam-grpc puts in the `grpc-status-details-bin`
 * trailer (ErrorInfo, BadRequest, RetryInfo), decoded. Branch on `reason`,
 * never on `message`.
 */
import { fromBinary, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { anyUnpack, type Any } from "@bufbuild/protobuf/wkt";
import { ConnectError } from "@connectrpc/connect";

import {
  BadRequestSchema,
  ErrorInfoSchema,
  RetryInfoSchema,
} from "./gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "./gen/google/rpc/status_pb.js";

/** The canonical gRPC status codes, by number. */
export const GRPC_CODES = [
  "OK",
  "CANCELLED",
  "UNKNOWN",
  "INVALID_ARGUMENT",
  "DEADLINE_EXCEEDED",
  "NOT_FOUND",
  "ALREADY_EXISTS",
  "PERMISSION_DENIED",
  "RESOURCE_EXHAUSTED",
  "FAILED_PRECONDITION",
  "ABORTED",
  "OUT_OF_RANGE",
  "UNIMPLEMENTED",
  "INTERNAL",
  "UNAVAILABLE",
  "DATA_LOSS",
  "UNAUTHENTICATED",
] as const;

export type GrpcCode = (typeof GRPC_CODES)[number];

/** One invalid request field (google.rpc.BadRequest.FieldViolation). */
export interface FieldViolation {
  /** The request field, e.g. `password` or `client.ip`. */
  field: string;
  /** Why it was refused, in English (for logs and developers). */
  description: string;
  /** A machine-readable reason, when the server gives one. */
  reason: string;
}

/** The domain of every ErrorInfo iam-grpc sends. */
export const IAM_ERROR_DOMAIN = "iam.v1";

/**
 * A failed call, decoded. Thrown by the TokenVerifier too, with the same
 * codes and reasons as the server's VerifyAccessToken.
 */
export class IamError extends Error {
  override name = "IamError";
  /** The gRPC status code by name, e.g. "INVALID_ARGUMENT". */
  readonly code: GrpcCode;
  /** The gRPC status code's number (3 for INVALID_ARGUMENT). */
  readonly status: number;
  /** ErrorInfo.reason (e.g. "INVALID_CREDENTIALS"); "" when the error carried none. */
  readonly reason: string;
  /** ErrorInfo.domain: "iam.v1" for iam-grpc's own errors; "" when absent. */
  readonly domain: string;
  /** ErrorInfo.metadata, e.g. {attempts_left: "3"} or {scope: "login.ip"}. */
  readonly metadata: Readonly<Record<string, string>>;
  /** BadRequest field violations; empty unless the request had invalid fields. */
  readonly fieldViolations: readonly FieldViolation[];
  /** RetryInfo.retry_delay in milliseconds (RATE_LIMITED); undefined when absent. */
  readonly retryDelay: number | undefined;

  constructor(init: {
    code: GrpcCode | number;
    message: string;
    reason?: string;
    domain?: string;
    metadata?: Record<string, string>;
    fieldViolations?: FieldViolation[];
    retryDelay?: number | undefined;
    cause?: unknown;
  }) {
    super(init.message, init.cause === undefined ? undefined : { cause: init.cause });
    const status = typeof init.code === "number" ? init.code : GRPC_CODES.indexOf(init.code);
    this.status = status >= 0 && status < GRPC_CODES.length ? status : 2;
    this.code = GRPC_CODES[this.status] ?? "UNKNOWN";
    this.reason = init.reason ?? "";
    this.domain = init.domain ?? "";
    this.metadata = Object.freeze({ ...(init.metadata ?? {}) });
    this.fieldViolations = Object.freeze([...(init.fieldViolations ?? [])]);
    this.retryDelay = init.retryDelay;
  }
}

function durationMs(seconds: bigint, nanos: number): number {
  return Number(seconds) * 1000 + Math.round(nanos / 1e6);
}

/** Unpack the detail messages of one type from a list of Any. */
function unpackAll<Desc extends DescMessage>(details: Any[], desc: Desc): MessageShape<Desc>[] {
  const found: MessageShape<Desc>[] = [];
  for (const detail of details) {
    try {
      const message = anyUnpack(detail, desc);
      if (message !== undefined) found.push(message);
    } catch {
      // A detail that does not decode is skipped, like ConnectError.findDetails does.
    }
  }
  return found;
}

function fromParts(
  status: number,
  message: string,
  infos: MessageShape<typeof ErrorInfoSchema>[],
  badRequests: MessageShape<typeof BadRequestSchema>[],
  retries: MessageShape<typeof RetryInfoSchema>[],
  cause: unknown,
): IamError {
  const info = infos[0];
  const retry = retries[0]?.retryDelay;
  return new IamError({
    code: status,
    message,
    reason: info?.reason ?? "",
    domain: info?.domain ?? "",
    metadata: info ? { ...info.metadata } : {},
    fieldViolations: badRequests.flatMap((bad) =>
      bad.fieldViolations.map((v) => ({ field: v.field, description: v.description, reason: v.reason })),
    ),
    retryDelay: retry ? durationMs(retry.seconds, retry.nanos) : undefined,
    cause,
  });
}

/**
 * Decode the `grpc-status-details-bin` trailer value (a serialized
 * google.rpc.Status) of any gRPC library, e.g. @grpc/grpc-js:
 * `decodeStatusDetails(err.metadata.get("grpc-status-details-bin")[0])`.
 */
export function decodeStatusDetails(bytes: Uint8Array, cause?: unknown): IamError {
  const status = fromBinary(StatusSchema, bytes);
  return fromParts(
    status.code,
    status.message,
    unpackAll(status.details, ErrorInfoSchema),
    unpackAll(status.details, BadRequestSchema),
    unpackAll(status.details, RetryInfoSchema),
    cause,
  );
}

interface GrpcJsLikeError {
  code: number;
  details?: string;
  message?: string;
  metadata: { get(key: string): unknown[] };
}

function isGrpcJsLike(value: unknown): value is GrpcJsLikeError {
  if (typeof value !== "object" || value === null) return false;
  const candidate = value as Partial<GrpcJsLikeError>;
  return typeof candidate.code === "number" && typeof candidate.metadata?.get === "function";
}

/**
 * Turn whatever a call threw into an IamError: a ConnectError (this
 * package's client), an @grpc/grpc-js ServiceError, an IamError (returned
 * as is) or anything else (code UNKNOWN, no reason).
 */
export function decodeError(error: unknown): IamError {
  if (error instanceof IamError) return error;
  if (error instanceof ConnectError) {
    return fromParts(
      error.code,
      error.rawMessage,
      error.findDetails(ErrorInfoSchema),
      error.findDetails(BadRequestSchema),
      error.findDetails(RetryInfoSchema),
      error,
    );
  }
  if (isGrpcJsLike(error)) {
    const raw = error.metadata.get("grpc-status-details-bin")[0];
    if (raw instanceof Uint8Array) {
      try {
        return decodeStatusDetails(raw, error);
      } catch {
        // Not a google.rpc.Status: fall through to the bare status code.
      }
    }
    return new IamError({ code: error.code, message: error.details ?? error.message ?? "", cause: error });
  }
  const message = error instanceof Error ? error.message : String(error);
  return new IamError({ code: "UNKNOWN", message, cause: error });
}
