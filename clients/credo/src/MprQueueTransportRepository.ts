import type { Agent, AgentContext } from '@credo-ts/core'
import {
  DidCommMessagePickupApi,
  DidCommMessagePickupEventTypes,
  DidCommMessagePickupSessionRole,
  type AddMessageOptions,
  type DidCommEncryptedMessage,
  type DidCommMessagePickupLiveSessionSavedEvent,
  type DidCommMessagePickupSession,
  type DidCommQueueTransportRepository,
  type GetAvailableMessageCountOptions,
  type MessagePickupLiveSessionRemovedEvent,
  type QueuedDidCommMessage,
  type RemoveMessagesOptions,
  type TakeFromQueueOptions,
} from '@credo-ts/didcomm'

import { MprError, MprProtocolError } from './errors.js'
import { RpcSocket, silentLogger, type MprLogger, type ReconnectOptions } from './rpc.js'

/** A device token for MPR's push notifications (`type` "fcm", or e.g. "apns"). */
export interface MprPushNotificationToken {
  type: string
  token?: string
}

export type PushTokenHook = (
  agentContext: AgentContext,
  connectionId: string
) => MprPushNotificationToken | undefined | Promise<MprPushNotificationToken | undefined>

export interface MprQueueTransportRepositoryOptions {
  /** WebSocket URL of mpr-server, e.g. `ws://mpr.internal:3100` (or `wss://...`). */
  url: string
  /**
   * Stable id of this mediator instance (sent as `socket_id`). With it, MPR keeps this instance's
   * live sessions through a short disconnection (its SESSION_GRACE_MS). Use one id per instance,
   * never the same for two instances running at once.
   */
  socketId?: string
  /** Mediator authentication secret or JWT (sent as `Authorization: Bearer <token>`). */
  token?: string
  /**
   * Returns the device token of the wallet behind `connectionId` (or undefined). It is called for
   * every `addMessage`; MPR sends a push when no live session holds the connection.
   */
  pushToken?: PushTokenHook
  /** Where this package logs; default: the attached agent's logger, before that nothing. */
  logger?: MprLogger
  /** Timeout of every call (ms). Default 5000 (mpr-server answers within CALL_TIMEOUT_MS, 1500). */
  callTimeoutMs?: number
  /** Timeout of one connection attempt (ms). Default 5000. */
  connectTimeoutMs?: number
  /** WebSocket ping interval; a connection without pong for this long is replaced (ms). Default 15000. */
  heartbeatMs?: number
  /** Reconnect backoff (forever, capped, with jitter). */
  reconnect?: ReconnectOptions
}

export interface AttachOptions {
  /** How long `attach` waits for the first connection to MPR (ms); default 10000. */
  connectTimeoutMs?: number
}

/** The wire form of a queued message. */
interface WireQueuedMessage {
  id: string
  receivedAt: string
  encryptedMessage: DidCommEncryptedMessage
}

type AttachableAgent = Pick<Agent, 'events' | 'dependencyManager' | 'config'>

/**
 * Credo's `DidCommQueueTransportRepository` on mpr-server, with MPR's cross-instance live
 * delivery: pass it as `new DidCommModule({ queueTransportRepository })`, then `attach(agent)`.
 */
export class MprQueueTransportRepository implements DidCommQueueTransportRepository {
  private readonly rpc: RpcSocket
  private logger: MprLogger
  private readonly ownLogger: boolean
  private readonly pushToken?: PushTokenHook
  private agent: AttachableAgent | undefined
  /** Live sessions (role MessageHolder) held by this process, by connection id. */
  private readonly sessions = new Map<string, DidCommMessagePickupSession>()
  /** Per connection, the tail of the chain of deliveries (keeps their order). */
  private readonly deliveries = new Map<string, Promise<void>>()
  private closed = false

  constructor(options: MprQueueTransportRepositoryOptions) {
    if (!options || typeof options.url !== 'string') throw new MprError('MprQueueTransportRepository needs { url }')
    const url = new URL(options.url) // throws on a malformed URL, at once
    if (url.protocol !== 'ws:' && url.protocol !== 'wss:') {
      throw new MprError(`MPR url must be ws:// or wss://, not ${url.protocol}`)
    }
    this.ownLogger = options.logger !== undefined
    this.logger = options.logger ?? silentLogger
    this.pushToken = options.pushToken
    this.rpc = new RpcSocket({
      url: options.url,
      socketId: options.socketId,
      token: options.token,
      callTimeoutMs: options.callTimeoutMs ?? 5000,
      connectTimeoutMs: options.connectTimeoutMs ?? 5000,
      heartbeatMs: options.heartbeatMs ?? 15000,
      reconnect: {
        initialDelayMs: options.reconnect?.initialDelayMs ?? 250,
        maxDelayMs: options.reconnect?.maxDelayMs ?? 10000,
      },
      logger: {
        debug: (m, d) => this.logger.debug(m, d),
        info: (m, d) => this.logger.info(m, d),
        warn: (m, d) => this.logger.warn(m, d),
        error: (m, d) => this.logger.error(m, d),
      },
      onNotification: (method, params) => this.notified(method, params),
      onOpen: (reconnected) => this.opened(reconnected),
    })
  }

  /** True while the WebSocket to MPR is open. */
  get connected(): boolean {
    return this.rpc.isOpen
  }

  /** How many times the connection to MPR was (re)established. */
  get connectionCount(): number {
    return this.rpc.connections
  }

  /** Connection ids of the live sessions this process holds (and has registered with MPR). */
  get liveSessionConnectionIds(): string[] {
    return [...this.sessions.keys()]
  }

  /**
   * Connect to MPR (if not yet) and wire `agent`'s live sessions: every Pickup v2 live session the
   * agent opens is registered with MPR, and messages MPR notifies for it (added through any
   * mediator instance) are delivered on it. Resolves once connected; rejects if the first
   * connection takes longer than `connectTimeoutMs` (it keeps trying in the background).
   */
  async attach(agent: AttachableAgent, options: AttachOptions = {}): Promise<void> {
    if (this.closed) throw new MprError('MprQueueTransportRepository is closed')
    if (this.agent !== undefined && this.agent !== agent) throw new MprError('already attached to another agent')
    if (this.agent === undefined) {
      this.agent = agent
      if (!this.ownLogger && agent.config?.logger) this.logger = agent.config.logger
      agent.events.on<DidCommMessagePickupLiveSessionSavedEvent>(
        DidCommMessagePickupEventTypes.LiveSessionSaved,
        this.onSessionSaved
      )
      agent.events.on<MessagePickupLiveSessionRemovedEvent>(
        DidCommMessagePickupEventTypes.LiveSessionRemoved,
        this.onSessionRemoved
      )
    }
    this.rpc.start()
    await this.rpc.waitOpen(options.connectTimeoutMs ?? 10000)
  }

  /** Connect without an agent (no live-session wiring), e.g. for tools and tests. */
  async connect(timeoutMs = 10000): Promise<void> {
    if (this.closed) throw new MprError('MprQueueTransportRepository is closed')
    this.rpc.start()
    await this.rpc.waitOpen(timeoutMs)
  }

  /** Unregister the listeners and close the connection (live sessions end with it in MPR). */
  async close(): Promise<void> {
    if (this.closed) return
    this.closed = true
    if (this.agent !== undefined) {
      this.agent.events.off(DidCommMessagePickupEventTypes.LiveSessionSaved, this.onSessionSaved)
      this.agent.events.off(DidCommMessagePickupEventTypes.LiveSessionRemoved, this.onSessionRemoved)
    }
    this.sessions.clear()
    await this.rpc.close()
    await Promise.allSettled([...this.deliveries.values()])
  }

  // -- DidCommQueueTransportRepository -------------------------------------------------------

  async getAvailableMessageCount(_agentContext: AgentContext, options: GetAvailableMessageCountOptions): Promise<number> {
    const params: Record<string, unknown> = { connectionId: options.connectionId }
    if (options.recipientDid !== undefined) params.recipientDid = options.recipientDid
    const result = await this.rpc.call('getAvailableMessageCount', params)
    if (typeof result !== 'number') throw new MprProtocolError(`getAvailableMessageCount answered ${describe(result)}`)
    return result
  }

  async takeFromQueue(_agentContext: AgentContext, options: TakeFromQueueOptions): Promise<QueuedDidCommMessage[]> {
    // Credo: an absent limit means all messages. MPR: an absent (or 0) limit means all; so a
    // limit of 0 (no message wanted) is answered here.
    if (options.limit !== undefined && options.limit <= 0) return []
    const params: Record<string, unknown> = { connectionId: options.connectionId }
    if (options.recipientDid !== undefined) params.recipientDid = options.recipientDid
    if (options.limit !== undefined) params.limit = options.limit
    if (options.deleteMessages !== undefined) params.deleteMessages = options.deleteMessages
    const result = await this.rpc.call('takeFromQueue', params)
    if (!Array.isArray(result)) throw new MprProtocolError(`takeFromQueue answered ${describe(result)}`)
    return result.map(toQueuedMessage)
  }

  async addMessage(agentContext: AgentContext, options: AddMessageOptions): Promise<string> {
    // MPR stamps receivedAt itself when it stores the message; options.receivedAt has no wire field.
    const params: Record<string, unknown> = {
      connectionId: options.connectionId,
      recipientDids: options.recipientDids,
      payload: options.payload,
    }
    if (this.pushToken !== undefined) {
      let token: MprPushNotificationToken | undefined
      try {
        token = await this.pushToken(agentContext, options.connectionId)
      } catch (error) {
        // a failing lookup must not lose the message: store it without a push
        this.logger.warn('pushToken hook failed; queueing the message without a push token', {
          connectionId: options.connectionId,
          error: String(error),
        })
      }
      if (token !== undefined && token !== null) params.pushNotificationToken = token
    }
    const result = await this.rpc.call('addMessage', params)
    const messageId = (result as { messageId?: unknown } | null)?.messageId
    if (typeof messageId !== 'string') throw new MprProtocolError(`addMessage answered ${describe(result)}`)
    return messageId
  }

  async removeMessages(_agentContext: AgentContext, options: RemoveMessagesOptions): Promise<void> {
    if (options.messageIds.length === 0) return
    const result = await this.rpc.call('removeMessages', {
      connectionId: options.connectionId,
      messageIds: options.messageIds,
    })
    if (typeof result !== 'boolean') throw new MprProtocolError(`removeMessages answered ${describe(result)}`)
  }

  // -- live sessions --------------------------------------------------------------------------

  private readonly onSessionSaved = (event: DidCommMessagePickupLiveSessionSavedEvent): void => {
    const session = event.payload.session
    if (session.role !== DidCommMessagePickupSessionRole.MessageHolder) return
    this.sessions.set(session.connectionId, session)
    this.register(session).catch(() => undefined)
  }

  private readonly onSessionRemoved = (event: MessagePickupLiveSessionRemovedEvent): void => {
    const session = event.payload.session
    if (session.role !== DidCommMessagePickupSessionRole.MessageHolder) return
    if (this.sessions.get(session.connectionId)?.id === session.id) this.sessions.delete(session.connectionId)
    if (!this.rpc.isOpen) return // MPR dropped this socket's sessions (or drops them after the grace time)
    this.rpc
      .call('removeLiveSession', { connectionId: session.connectionId, sessionId: session.id })
      .catch((error: unknown) =>
        this.logger.warn('MPR removeLiveSession failed', { connectionId: session.connectionId, error: String(error) })
      )
  }

  private async register(session: DidCommMessagePickupSession): Promise<void> {
    if (!this.rpc.isOpen) return // registered when the connection is back (see opened)
    try {
      const ok = await this.rpc.call('addLiveSession', { connectionId: session.connectionId, sessionId: session.id })
      if (ok !== true) throw new MprProtocolError(`addLiveSession answered ${describe(ok)}`)
      this.logger.debug('Live session registered with MPR', { connectionId: session.connectionId })
    } catch (error) {
      // the session still works locally; messages for it reach it by pickup (status/delivery
      // requests) until the next reconnect registers it again
      this.logger.warn('MPR addLiveSession failed', { connectionId: session.connectionId, error: String(error) })
    }
  }

  /** After every (re)connection: subscribe to notifications and re-register every live session. */
  private async opened(reconnected: boolean): Promise<void> {
    try {
      // The original MPR (rpc-websockets) notifies only subscribed sockets; mpr-server always does.
      await this.rpc.call('rpc.on', ['messagesReceived'])
    } catch (error) {
      this.logger.warn('MPR rpc.on messagesReceived failed', { error: String(error) })
    }
    const sessions = [...this.sessions.values()]
    if (reconnected && sessions.length > 0) {
      this.logger.info(`Re-registering ${sessions.length} live session(s) with MPR`)
    }
    await Promise.all(sessions.map((session) => this.register(session)))
  }

  // -- notifications --------------------------------------------------------------------------

  private notified(method: string, params: unknown): void {
    if (method !== 'messagesReceived') return
    const p = params as { connectionId?: unknown; messages?: unknown } | null
    if (typeof p?.connectionId !== 'string' || !Array.isArray(p.messages)) {
      this.logger.warn('MPR sent a malformed messagesReceived notification; ignored')
      return
    }
    const connectionId = p.connectionId
    let messages: QueuedDidCommMessage[]
    try {
      messages = p.messages.map(toQueuedMessage)
    } catch (error) {
      this.logger.warn('MPR sent a malformed messagesReceived notification; ignored', { error: String(error) })
      return
    }
    const previous = this.deliveries.get(connectionId) ?? Promise.resolve()
    const next = previous.then(() => this.deliver(connectionId, messages))
    this.deliveries.set(connectionId, next)
    next.finally(() => {
      if (this.deliveries.get(connectionId) === next) this.deliveries.delete(connectionId)
    })
  }

  private async deliver(connectionId: string, messages: QueuedDidCommMessage[]): Promise<void> {
    const session = this.sessions.get(connectionId)
    if (session === undefined || this.agent === undefined || this.closed) {
      // The session is gone (the wallet disconnected a moment ago): the messages stay leased in MPR
      // until the lease expires (MESSAGE_LEASE_MS); releasing our stale registration hands them back
      // at once, and the wallet takes them with its next pickup or live session.
      this.logger.debug('MPR notified messages for a live session this process no longer holds', {
        connectionId,
        count: messages.length,
      })
      if (this.rpc.isOpen && !this.closed) {
        await this.rpc.call('removeLiveSession', { connectionId }).catch(() => undefined)
      }
      return
    }
    try {
      const pickup = this.agent.dependencyManager.resolve(DidCommMessagePickupApi)
      await pickup.deliverMessages({ pickupSessionId: session.id, messages })
      this.logger.debug(`Delivered ${messages.length} message(s) from MPR to the live session`, {
        connectionId,
        messageIds: messages.map((m) => m.id),
      })
    } catch (error) {
      // not acknowledged, so MPR keeps them leased and redelivers them after the lease
      this.logger.warn('Delivering MPR messages to the live session failed', { connectionId, error: String(error) })
    }
  }
}

function toQueuedMessage(item: unknown): QueuedDidCommMessage {
  const m = item as Partial<WireQueuedMessage> | null
  if (typeof m?.id !== 'string' || typeof m.receivedAt !== 'string' || typeof m.encryptedMessage !== 'object') {
    throw new MprProtocolError(`MPR sent a malformed queued message: ${describe(item)}`)
  }
  const receivedAt = new Date(m.receivedAt)
  if (Number.isNaN(receivedAt.getTime())) throw new MprProtocolError(`MPR sent a bad receivedAt: ${m.receivedAt}`)
  return { id: m.id, receivedAt, encryptedMessage: m.encryptedMessage as DidCommEncryptedMessage }
}

function describe(value: unknown): string {
  const text = JSON.stringify(value)
  return text === undefined ? String(value) : text.length > 200 ? `${text.slice(0, 200)}...` : text
}
