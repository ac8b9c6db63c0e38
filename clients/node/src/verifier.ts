/**
 * Local access-token verification against iam-grpc's JWKS, with `jose`.
 *
 * The checks follow the server's VerifyAccessToken: header `typ: at+jwt`,
 * an allowed `alg` (ES256 or EdDSA, as the server signs) that the key's own
 * `alg` matches, a known `kid`, the signature, then `iss`, `aud`, `exp` and
 * `iat` (with leeway) and the required claims. Failures throw IamError with
 * the server's reasons: TOKEN_INVALID, TOKEN_EXPIRED (only after the
 * signature verified), ROLE_REQUIRED. A locally verified token may have been
 * revoked (logout, reuse detection, a disabled user) until it expires; with
 * `checkRevocation` the verifier also asks VerifyAccessToken, which knows
 * the deny-list.
 */
import {
  createLocalJWKSet,
  createRemoteJWKSet,
  decodeProtectedHeader,
  errors as joseErrors,
  jwtVerify,
  type JSONWebKeySet,
  type JWTPayload,
  type JWTVerifyGetKey,
} from "jose";

import type { IamClient } from "./client.js";
import { decodeError, IAM_ERROR_DOMAIN, IamError } from "./errors.js";

/** The signing algorithms iam-grpc uses (setting `tokens.algorithm`). */
export type SigningAlgorithm = "ES256" | "EdDSA";

const MAX_TOKEN_LENGTH = 4096;
const FORBIDDEN_HEADERS = ["jku", "x5u", "jwk", "x5c", "crit"];
const REQUIRED_CLAIMS = ["iss", "aud", "sub", "sid", "did", "roles", "jti", "iat", "exp", "auth_time"];

/** Who a verified access token speaks for. */
export interface Principal {
  userId: string;
  sessionId: string;
  deviceId: string;
  /** The user's roles when the token was minted, sorted. */
  roles: string[];
  jti: string;
  expiresAt: Date;
  /** When the user last proved a credential (sign-in or step-up). */
  authTime: Date;
  /** Every claim, as signed. */
  claims: JWTPayload;
}

export interface TokenVerifierOptions {
  /**
   * Where the keys come from, one of:
   * - a URL (string or URL): the ops listener's `/.well-known/jwks.json`,
   *   fetched over HTTP, cached, refetched when a token names an unknown `kid`;
   * - a JWK set (object or JSON text): fixed keys you fetched yourself.
   * Unset: `client`'s TokenService.GetJwks, cached the same way.
   */
  jwks?: string | URL | JSONWebKeySet;
  /** The iam-grpc client: the key source when `jwks` is unset, and needed by `checkRevocation`. */
  client?: IamClient;
  /** Expected `iss` (setting `tokens.issuer`, default "iam-grpc"). */
  issuer?: string;
  /** Expected `aud` (setting `tokens.audience`, default "iam-grpc"). */
  audience?: string;
  /** Accepted `alg` values; default both that iam-grpc can sign with. */
  algorithms?: SigningAlgorithm[];
  /** Clock skew allowed on `exp` and `iat`, in seconds (default 30, the server's leeway). */
  leewaySeconds?: number;
  /** How long fetched keys are used before a refetch, in ms (default 300000, the JWKS max-age). */
  cacheMaxAgeMs?: number;
  /** The least time between two fetches caused by unknown `kid`s, in ms (default 10000). */
  refetchIntervalMs?: number;
  /** Also ask VerifyAccessToken on every verify (one RPC; sees revocations at once). Needs `client`. */
  checkRevocation?: boolean;
  /** The clock (tests, replays); default the system time. */
  now?: () => Date;
}

export interface VerifyOptions {
  /** Roles that must all be present (PERMISSION_DENIED / ROLE_REQUIRED otherwise). */
  requiredRoles?: string[];
  /** Overrides the verifier's `checkRevocation` for this call. */
  checkRevocation?: boolean;
}

function invalid(cause?: unknown): IamError {
  return new IamError({
    code: "UNAUTHENTICATED",
    reason: "TOKEN_INVALID",
    domain: IAM_ERROR_DOMAIN,
    message: "The token is invalid.",
    cause,
  });
}

function unavailable(cause: unknown): IamError {
  return new IamError({
    code: "UNAVAILABLE",
    reason: "BACKEND_UNAVAILABLE",
    domain: IAM_ERROR_DOMAIN,
    message: "The key set could not be read.",
    cause,
  });
}

function parseJwks(value: string | JSONWebKeySet): JSONWebKeySet {
  const document: unknown = typeof value === "string" ? JSON.parse(value) : value;
  if (typeof document !== "object" || document === null || !Array.isArray((document as JSONWebKeySet).keys)) {
    throw new Error("not a JWK set");
  }
  return document as JSONWebKeySet;
}

/** GetJwks over gRPC, cached; refetched for an unknown kid at most once per interval. */
class GrpcKeySource {
  private keys: JWTVerifyGetKey | undefined;
  private fetchedAt = -Infinity;
  private pending: Promise<void> | undefined;

  constructor(
    private readonly client: IamClient,
    private readonly maxAgeMs: number,
    private readonly refetchMs: number,
  ) {}

  private load(): Promise<void> {
    this.pending ??= (async () => {
      try {
        const answer = await this.client.token.getJwks({});
        this.keys = createLocalJWKSet(parseJwks(answer.jwksJson));
        this.fetchedAt = performance.now();
      } finally {
        this.pending = undefined;
      }
    })();
    return this.pending;
  }

  readonly getKey: JWTVerifyGetKey = async (header, token) => {
    if (this.keys === undefined || performance.now() - this.fetchedAt > this.maxAgeMs) await this.load();
    try {
      return await this.keys!(header, token);
    } catch (error) {
      // A key published after our last fetch: look again, but not for every forged kid.
      if (!(error instanceof joseErrors.JWKSNoMatchingKey) || performance.now() - this.fetchedAt < this.refetchMs) {
        throw error;
      }
      await this.load();
      return this.keys!(header, token);
    }
  };
}

export class TokenVerifier {
  private readonly getKey: JWTVerifyGetKey;
  private readonly issuer: string;
  private readonly audience: string;
  private readonly algorithms: SigningAlgorithm[];
  private readonly leeway: number;
  private readonly now: () => Date;

  constructor(private readonly options: TokenVerifierOptions) {
    const maxAge = options.cacheMaxAgeMs ?? 300_000;
    const refetch = options.refetchIntervalMs ?? 10_000;
    const { jwks } = options;
    if (jwks instanceof URL || (typeof jwks === "string" && /^https?:\/\//.test(jwks))) {
      this.getKey = createRemoteJWKSet(new URL(jwks), { cacheMaxAge: maxAge, cooldownDuration: refetch });
    } else if (jwks !== undefined) {
      this.getKey = createLocalJWKSet(parseJwks(jwks));
    } else if (options.client !== undefined) {
      this.getKey = new GrpcKeySource(options.client, maxAge, refetch).getKey;
    } else {
      throw new Error("TokenVerifier needs `jwks` (a URL or a key set) or `client`");
    }
    if (options.checkRevocation && options.client === undefined) {
      throw new Error("checkRevocation needs `client` (it calls VerifyAccessToken)");
    }
    this.issuer = options.issuer ?? "iam-grpc";
    this.audience = options.audience ?? "iam-grpc";
    this.algorithms = options.algorithms ?? ["ES256", "EdDSA"];
    this.leeway = options.leewaySeconds ?? 30;
    this.now = options.now ?? (() => new Date());
  }

  /** Verify an access token (without "Bearer "); throws IamError. */
  async verify(token: string, verifyOptions: VerifyOptions = {}): Promise<Principal> {
    if (typeof token !== "string" || token.length === 0 || token.length > MAX_TOKEN_LENGTH) throw invalid();
    if (token.split(".").length !== 3) throw invalid();
    let header: ReturnType<typeof decodeProtectedHeader>;
    try {
      header = decodeProtectedHeader(token);
    } catch (error) {
      throw invalid(error);
    }
    if (
      typeof header.kid !== "string" ||
      header.typ !== "at+jwt" ||
      !this.algorithms.includes(header.alg as SigningAlgorithm) ||
      FORBIDDEN_HEADERS.some((name) => name in header)
    ) {
      throw invalid();
    }
    const now = this.now();
    let claims: JWTPayload;
    try {
      ({ payload: claims } = await jwtVerify(token, this.getKey, {
        algorithms: this.algorithms,
        issuer: this.issuer,
        audience: this.audience,
        typ: "at+jwt",
        clockTolerance: this.leeway,
        currentDate: now,
        requiredClaims: REQUIRED_CLAIMS,
      }));
    } catch (error) {
      if (error instanceof joseErrors.JWTExpired) {
        throw new IamError({
          code: "UNAUTHENTICATED",
          reason: "TOKEN_EXPIRED",
          domain: IAM_ERROR_DOMAIN,
          message: "The token has expired.",
          cause: error,
        });
      }
      const keySetFailed = error instanceof joseErrors.JWKSTimeout || error instanceof joseErrors.JWKSInvalid;
      if (error instanceof joseErrors.JOSEError && !keySetFailed) throw invalid(error);
      if (error instanceof IamError) throw error;
      throw unavailable(error); // the key source failed (HTTP, gRPC, a malformed set)
    }
    const roles = claims.roles;
    if (
      typeof claims.sub !== "string" ||
      typeof claims.sid !== "string" ||
      typeof claims.did !== "string" ||
      typeof claims.jti !== "string" ||
      !Array.isArray(roles) ||
      !roles.every((role): role is string => typeof role === "string") ||
      typeof claims.iat !== "number" ||
      typeof claims.auth_time !== "number" ||
      claims.iat > now.getTime() / 1000 + this.leeway
    ) {
      throw invalid();
    }
    const missing = (verifyOptions.requiredRoles ?? []).filter((role) => !roles.includes(role));
    if (missing.length > 0) {
      throw new IamError({
        code: "PERMISSION_DENIED",
        reason: "ROLE_REQUIRED",
        domain: IAM_ERROR_DOMAIN,
        message: "A required role is missing.",
        metadata: { missing: [...missing].sort().join(",") },
      });
    }
    if (verifyOptions.checkRevocation ?? this.options.checkRevocation) {
      const client = this.options.client;
      if (client === undefined) throw new Error("checkRevocation needs `client` (it calls VerifyAccessToken)");
      try {
        await client.token.verifyAccessToken({ accessToken: token, requiredRoles: verifyOptions.requiredRoles ?? [] });
      } catch (error) {
        throw decodeError(error);
      }
    }
    return {
      userId: claims.sub,
      sessionId: claims.sid,
      deviceId: claims.did,
      roles: [...roles],
      jti: claims.jti,
      expiresAt: new Date((claims.exp as number) * 1000),
      authTime: new Date(claims.auth_time * 1000),
      claims,
    };
  }
}
