import WebSocket from 'ws'

import { MprConnectionLostError, MprNotConnectedError, MprProtocolError, MprRpcError, MprTimeoutError } from './errors.js'

/** The subset of Credo's `Logger` this package writes to. */
export interface MprLogger {
  debug(message: string, data?: Record<string, unknown>): void
  info(message: string, data?: Record<string, unknown>): void
  warn(message: string, data?: Record<string, unknown>): void
  error(message: string, data?: Record<string, unknown>): void
}

export const silentLogger: MprLogger = {
  debug: () => undefined,
  info: () => undefined,
  warn: () => undefined,
  error: () => undefined,
}

export interface ReconnectOptions {
  /** Delay before the first reconnect attempt (ms, before jitter). Default 250. */
  initialDelayMs?: number
  /** Cap of the exponential backoff (ms). Default 10000. */
  maxDelayMs?: number
}

export interface RpcSocketOptions {
  url: string
  socketId?: string
  token?: string
  callTimeoutMs: number
  connectTimeoutMs: number
  heartbeatMs: number
  reconnect: Required<ReconnectOptions>
  logger: MprLogger
  /** Called with every server notification (a frame with `method` and no `id`). */
  onNotification: (method: string, params: unknown) => void
  /** Called after every successful (re)connection, once the socket is open for calls. */
  onOpen: (reconnected: boolean) => void | Promise<void>
}

interface Pending {
  method: string
  resolve: (value: unknown) => void
  reject: (error: Error) => void
  timer: NodeJS.Timeout
}

/**
 * One JSON-RPC 2.0 connection over a WebSocket (the framing mpr-server speaks: one request
 * object per text frame, answers matched by id, notifications without id), kept open forever:
 * after any close or failure it reconnects with capped exponential backoff and full jitter,
 * until `close()`.
 */
export class RpcSocket {
  private ws: WebSocket | undefined
  private open = false
  private closed = false
  private started = false
  private nextId = 1
  private readonly pending = new Map<number, Pending>()
  private attempt = 0
  private reconnectTimer: NodeJS.Timeout | undefined
  private heartbeatTimer: NodeJS.Timeout | undefined
  private connectTimer: NodeJS.Timeout | undefined
  private lastError = 'not connected yet'
  private everOpened = false
  private openWaiters: Array<() => void> = []
  /** Number of times the socket opened (1 after the first connection). */
  connections = 0

  constructor(private readonly options: RpcSocketOptions) {}

  get isOpen(): boolean {
    return this.open
  }

  get endpoint(): string {
    return redact(this.options.url)
  }

  /** Start connecting (idempotent). */
  start(): void {
    if (this.started || this.closed) return
    this.started = true
    this.connect()
  }

  /** Resolves when the socket is open (now or later); rejects after `timeoutMs`. */
  waitOpen(timeoutMs: number): Promise<void> {
    if (this.open) return Promise.resolve()
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.openWaiters = this.openWaiters.filter((w) => w !== done)
        reject(new MprNotConnectedError(`could not connect to MPR at ${this.endpoint} within ${timeoutMs} ms: ${this.lastError}`))
      }, timeoutMs)
      const done = () => {
        clearTimeout(timer)
        resolve()
      }
      this.openWaiters.push(done)
    })
  }

  /** Call `method`; rejects at once when the socket is not open. */
  call(method: string, params?: unknown): Promise<unknown> {
    const ws = this.ws
    if (this.closed) return Promise.reject(new MprConnectionLostError(`MPR client is closed (${method})`))
    if (!this.open || ws === undefined) {
      return Promise.reject(
        new MprNotConnectedError(`not connected to MPR at ${this.endpoint} (${method}); reconnecting: ${this.lastError}`)
      )
    }
    const id = this.nextId++
    const frame: Record<string, unknown> = { jsonrpc: '2.0', method, id }
    if (params !== undefined) frame.params = params
    let text: string
    try {
      text = JSON.stringify(frame)
    } catch (error) {
      return Promise.reject(error as Error)
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id)
        reject(new MprTimeoutError(`MPR did not answer ${method} within ${this.options.callTimeoutMs} ms`))
      }, this.options.callTimeoutMs)
      this.pending.set(id, { method, resolve, reject, timer })
      ws.send(text, (error) => {
        if (error) this.settle(id, new MprConnectionLostError(`sending ${method} to MPR failed: ${error.message}`))
      })
    })
  }

  /** Stop reconnecting, close the socket (code 1000) and fail the calls in flight. */
  async close(): Promise<void> {
    if (this.closed) return
    this.closed = true
    clearTimeout(this.reconnectTimer)
    this.stopTimers()
    const ws = this.ws
    this.failAll(new MprConnectionLostError('MPR client closed'))
    this.open = false
    if (ws !== undefined && ws.readyState !== WebSocket.CLOSED) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          ws.terminate()
          resolve()
        }, 2000)
        ws.once('close', () => {
          clearTimeout(timer)
          resolve()
        })
        if (ws.readyState === WebSocket.CONNECTING) ws.terminate()
        else ws.close(1000, 'client closed')
      })
    }
  }

  // -- connection life cycle ------------------------------------------------------------------

  private connect(): void {
    if (this.closed) return
    const headers: Record<string, string> = {}
    if (this.options.token) headers.Authorization = `Bearer ${this.options.token}`
    const url = new URL(this.options.url)
    if (this.options.socketId) url.searchParams.set('socket_id', this.options.socketId)
    let ws: WebSocket
    try {
      ws = new WebSocket(url, { headers, perMessageDeflate: false, handshakeTimeout: this.options.connectTimeoutMs })
    } catch (error) {
      this.lastError = (error as Error).message
      this.scheduleReconnect()
      return
    }
    this.ws = ws
    this.connectTimer = setTimeout(() => {
      this.lastError = `no connection within ${this.options.connectTimeoutMs} ms`
      ws.terminate()
    }, this.options.connectTimeoutMs)
    ws.on('open', () => this.opened(ws))
    ws.on('message', (data, isBinary) => this.received(data, isBinary))
    ws.on('pong', () => {
      ;(ws as WebSocket & { mprAlive?: boolean }).mprAlive = true
    })
    ws.on('unexpected-response', (_request, response) => {
      this.lastError = `handshake refused with HTTP ${response.statusCode}`
      ws.terminate()
    })
    ws.on('error', (error) => {
      this.lastError = error.message
    })
    ws.on('close', (code, reason) => this.closedSocket(ws, code, reason.toString()))
  }

  private opened(ws: WebSocket): void {
    if (ws !== this.ws) return
    clearTimeout(this.connectTimer)
    const reconnected = this.everOpened
    this.everOpened = true
    this.open = true
    this.attempt = 0
    this.connections += 1
    this.lastError = 'connection lost'
    this.options.logger.info(`Connected to MPR at ${this.endpoint}`, { reconnected })
    this.startHeartbeat(ws)
    const waiters = this.openWaiters
    this.openWaiters = []
    for (const waiter of waiters) waiter()
    Promise.resolve()
      .then(() => this.options.onOpen(reconnected))
      .catch((error: unknown) => {
        this.options.logger.error('MPR connection set-up failed', { error: String(error) })
      })
  }

  private closedSocket(ws: WebSocket, code: number, reason: string): void {
    if (ws !== this.ws) return
    clearTimeout(this.connectTimer)
    this.stopTimers()
    const wasOpen = this.open
    this.open = false
    this.ws = undefined
    if (wasOpen) this.lastError = `connection closed (code ${code}${reason ? `, ${reason}` : ''})`
    this.failAll(new MprConnectionLostError(`connection to MPR lost before the answer arrived (${this.lastError})`))
    if (this.closed) return
    if (wasOpen) this.options.logger.warn(`Connection to MPR at ${this.endpoint} lost: ${this.lastError}; reconnecting`)
    this.scheduleReconnect()
  }

  private scheduleReconnect(): void {
    if (this.closed) return
    const { initialDelayMs, maxDelayMs } = this.options.reconnect
    const ceiling = Math.min(maxDelayMs, initialDelayMs * 2 ** Math.min(this.attempt, 30))
    // "equal jitter": half the ceiling plus a random half, so that mediators restarted together spread out
    const delay = ceiling / 2 + Math.random() * (ceiling / 2)
    this.attempt += 1
    this.options.logger.debug(`Reconnecting to MPR in ${Math.round(delay)} ms (attempt ${this.attempt})`, {
      error: this.lastError,
    })
    this.reconnectTimer = setTimeout(() => this.connect(), delay)
  }

  private startHeartbeat(ws: WebSocket): void {
    const alive = ws as WebSocket & { mprAlive?: boolean }
    alive.mprAlive = true
    this.heartbeatTimer = setInterval(() => {
      if (!alive.mprAlive) {
        this.lastError = `no pong from MPR within ${this.options.heartbeatMs} ms`
        ws.terminate()
        return
      }
      alive.mprAlive = false
      ws.ping()
    }, this.options.heartbeatMs)
  }

  private stopTimers(): void {
    clearInterval(this.heartbeatTimer)
    this.heartbeatTimer = undefined
  }

  private failAll(error: Error): void {
    const ids = [...this.pending.keys()]
    for (const id of ids) this.settle(id, error)
  }

  private settle(id: number, error: Error | undefined, result?: unknown): void {
    const pending = this.pending.get(id)
    if (pending === undefined) return
    this.pending.delete(id)
    clearTimeout(pending.timer)
    if (error) pending.reject(error)
    else pending.resolve(result)
  }

  // -- frames ---------------------------------------------------------------------------------

  private received(data: WebSocket.RawData, isBinary: boolean): void {
    let message: unknown
    try {
      const text = Array.isArray(data) ? Buffer.concat(data).toString('utf8') : Buffer.from(data as ArrayBuffer).toString('utf8')
      message = JSON.parse(text)
    } catch (error) {
      this.options.logger.warn('MPR sent a frame that is not JSON; ignored', { binary: isBinary, error: String(error) })
      return
    }
    for (const item of Array.isArray(message) ? message : [message]) this.dispatch(item)
  }

  private dispatch(item: unknown): void {
    if (typeof item !== 'object' || item === null) return
    const frame = item as { id?: unknown; method?: unknown; params?: unknown; result?: unknown; error?: unknown }
    if (typeof frame.method === 'string' && (frame.id === undefined || frame.id === null || frame.id === '')) {
      try {
        this.options.onNotification(frame.method, frame.params)
      } catch (error) {
        this.options.logger.error(`Handling the MPR notification ${frame.method} failed`, { error: String(error) })
      }
      return
    }
    if (typeof frame.id !== 'number') return
    const pending = this.pending.get(frame.id)
    if (pending === undefined) return
    if (frame.error !== undefined) {
      const error = (frame.error ?? {}) as { code?: unknown; message?: unknown; data?: unknown }
      this.settle(
        frame.id,
        new MprRpcError(
          pending.method,
          typeof error.code === 'number' ? error.code : 0,
          typeof error.message === 'string' ? error.message : 'error',
          error.data
        )
      )
    } else if (!('result' in frame)) {
      this.settle(frame.id, new MprProtocolError(`MPR answered ${pending.method} without a result`))
    } else {
      this.settle(frame.id, undefined, frame.result)
    }
  }
}

/** The URL without credentials or token, for messages. */
function redact(url: string): string {
  try {
    const parsed = new URL(url)
    parsed.username = ''
    parsed.password = ''
    if (parsed.searchParams.has('token')) parsed.searchParams.set('token', '***')
    return parsed.toString()
  } catch {
    return '<invalid url>'
  }
}
