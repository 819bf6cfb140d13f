/** Base class of every error this package raises. */
export class MprError extends Error {
  constructor(message: string) {
    super(message)
    this.name = new.target.name
  }
}

/** The call was not sent: there is no open connection to MPR right now (it is reconnecting). */
export class MprNotConnectedError extends MprError {}

/** The connection closed (or was closed by `close()`) before the answer arrived. */
export class MprConnectionLostError extends MprError {}

/** MPR did not answer the call within `callTimeoutMs`. */
export class MprTimeoutError extends MprError {}

/** MPR answered with a JSON-RPC error (e.g. -32602 Invalid params, -32001 Queue full, 500). */
export class MprRpcError extends MprError {
  constructor(
    readonly method: string,
    readonly code: number,
    readonly rpcMessage: string,
    readonly data?: unknown
  ) {
    super(`MPR ${method} failed: ${code} ${rpcMessage}${describeData(data)}`)
  }
}

/** MPR answered with something this client does not understand (a wrong result type). */
export class MprProtocolError extends MprError {}

function describeData(data: unknown): string {
  if (data === undefined || data === null) return ''
  if (typeof data === 'string') return `: ${data}`
  if (typeof data === 'object' && typeof (data as { details?: unknown }).details === 'string') {
    return `: ${(data as { details: string }).details}`
  }
  return `: ${JSON.stringify(data)}`
}
